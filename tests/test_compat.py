"""The single torchvision import path works with this machine's mismatched CUDA torchvision."""

from dka._compat import TORCHVISION_OPS_AVAILABLE, torchvision


def test_models_transforms_datasets_import():
    from PIL import Image
    import numpy as np

    assert torchvision.models.resnet18().fc.out_features == 1000
    t = torchvision.transforms.Compose([torchvision.transforms.RandomCrop(8, padding=2), torchvision.transforms.ToTensor()])
    assert t(Image.fromarray(np.zeros((8, 8, 3), np.uint8))).shape == (3, 8, 8)
    assert hasattr(torchvision.datasets, "CIFAR10")
    assert isinstance(TORCHVISION_OPS_AVAILABLE, bool)
