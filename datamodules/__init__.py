"""Lightning data modules: datasets with the DAD splits, and paired (clean, adversarial) data."""

from datamodules.base import DADDataModule, DataError, ImageTensorDataset, Splits
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.imagefolder import ImageFolderDataModule
from datamodules.paired import PairedDataModule
from datamodules.settings import DataSettings
from datamodules.svhn import SVHNDataModule

__all__ = [
    "CIFAR10DataModule", "CIFAR100DataModule", "DADDataModule", "DataError", "DataSettings", "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageTensorDataset", "PairedDataModule", "SVHNDataModule", "Splits",
]
