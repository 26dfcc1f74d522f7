"""Data: labelled image sources, the 15 corruptions, and the per-edge batch streams (no Ray here)."""
from cema_ray.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from cema_ray.data.sources import (
    DATA_SOURCES,
    DEFAULT_FASHION_MNIST_ROOT,
    DataSourceInfo,
    ImageFolderImages,
    LabeledImages,
    load_cifar10_batches,
    load_cifar10_c,
    load_cifar10_folder,
    load_fashion_mnist,
    load_image_folder,
    load_imagenet_c,
)
from cema_ray.data.streams import (
    GRADUAL_SEVERITIES,
    PROTOCOLS,
    Batch,
    Domain,
    EdgeStream,
    StreamSpec,
    dirichlet_order,
    plan_domains,
)

__all__ = [
    "CORRUPTIONS", "SEVERITIES", "corrupt",
    "DATA_SOURCES", "DEFAULT_FASHION_MNIST_ROOT", "DataSourceInfo", "ImageFolderImages", "LabeledImages",
    "load_cifar10_batches", "load_cifar10_c", "load_cifar10_folder", "load_fashion_mnist",
    "load_image_folder", "load_imagenet_c",
    "GRADUAL_SEVERITIES", "PROTOCOLS", "Batch", "Domain", "EdgeStream", "StreamSpec", "dirichlet_order",
    "plan_domains",
]
