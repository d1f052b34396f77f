"""Patch whitening (airbench's first layer): a conv whose filters map k x k image patches onto the
eigenbasis of their covariance, scaled to unit variance, so the net starts on decorrelated inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patches(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """All k x k patches of NCHW `images` as rows (num_patches, C*k*k), in conv-weight order."""
    cols = F.unfold(images.float(), kernel_size=kernel)  # (N, C*k*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def whitening_filters(images: torch.Tensor, kernel: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """Conv filters (C*k*k, C, k, k) that whiten the patches of `images`: W = diag(1/sqrt(l + eps)) V^T
    for the eigen-decomposition V diag(l) V^T of the patch covariance."""
    x = patches(images, kernel).double()
    x = x - x.mean(0)
    cov = x.T @ x / len(x)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    filters = eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]
    c = images.shape[1]
    return filters.flip(0).reshape(-1, c, kernel, kernel).float()  # largest variance first
