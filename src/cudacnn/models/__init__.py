"""Model zoo: plain nn.Modules registered by name. `create_model("resnet18", num_classes=10, stem="cifar")`."""

import importlib

from cudacnn.models.registry import create_model, list_models, register_model

# Importing a family registers its models.
from cudacnn.models import bn_dropout, resnet, simple, smallnet  # noqa: F401,E402
from cudacnn.models.resnet import load_pretrained  # noqa: E402

try:  # the record-speed family lives in its own module, built separately
    importlib.import_module("cudacnn.models.fast")
except ModuleNotFoundError as exc:
    if exc.name != "cudacnn.models.fast":
        raise

__all__ = ["create_model", "list_models", "register_model", "load_pretrained"]
