"""A small real image task for end-to-end tests: scikit-learn's 8x8 digits as 3-channel images."""
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset


Split = tuple[torch.Tensor, torch.Tensor]


def digits_tensors(size: int = 32, seed: int = 0) -> tuple[Split, Split]:
    """((x_train, y_train), (x_test, y_test)): x (N, 3, size, size) fp32 normalised, y (N,) int64.

    A stratified 75/25 split of the 1797 digits; images are upsampled bilinearly from 8x8,
    copied to 3 channels and normalised with the training set's mean and std.
    """
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target)

    def images(a):
        x = torch.as_tensor(a, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.expand(-1, 3, -1, -1).contiguous()

    x_train, x_test = images(x_train), images(x_test)
    mean, std = x_train.mean(), x_train.std()
    return (((x_train - mean) / std, torch.as_tensor(y_train, dtype=torch.int64)),
            ((x_test - mean) / std, torch.as_tensor(y_test, dtype=torch.int64)))


def digits_loaders(size: int = 32, batch: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """(train, test) DataLoaders of (x (B, 3, size, size) fp32, y (B,) int64); train shuffles with `seed`."""
    (x_train, y_train), (x_test, y_test) = digits_tensors(size, seed)
    shuffle = torch.Generator().manual_seed(seed)
    # drop_last: a final batch of 3 images would give BatchNorm noisy statistics.
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch, shuffle=True, generator=shuffle,
                       drop_last=True)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=batch, shuffle=False)
    return train, test
