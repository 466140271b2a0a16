"""Lightning data modules: datasets with the DAD splits, and paired (clean, adversarial) data."""

from datamodules.base import DADDataModule, ImageTensorDataset, Splits
from datamodules.digits import DigitsDataModule
from datamodules.paired import PairedDataModule

__all__ = ["DADDataModule", "DigitsDataModule", "ImageTensorDataset", "PairedDataModule", "Splits"]
