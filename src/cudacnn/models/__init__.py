"""Model zoo: plain nn.Modules registered by name. `create_model("resnet18", num_classes=10, stem="cifar")`."""

from cudacnn.models.registry import create_model, list_models, register_model

# Importing a family registers its models.
from cudacnn.models import bn_dropout, fast, resnet, simple, smallnet  # noqa: F401
from cudacnn.models.resnet import load_pretrained

__all__ = ["create_model", "list_models", "register_model", "load_pretrained"]
