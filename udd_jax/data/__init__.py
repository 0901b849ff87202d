"""Offline data loading, recorded invertible preprocessing, and clustering of real data."""

from udd_jax.data.clustering import kmeans as kmeans
from udd_jax.data.loading import BUILTIN_DATASETS as BUILTIN_DATASETS
from udd_jax.data.loading import DATA_DIR_ENV as DATA_DIR_ENV
from udd_jax.data.loading import load_dataset as load_dataset
from udd_jax.data.loading import read_idx as read_idx
from udd_jax.data.loading import resolve_data_dir as resolve_data_dir
from udd_jax.data.preprocessing import PREPROCESSING_METHODS as PREPROCESSING_METHODS
from udd_jax.data.preprocessing import Preprocessing as Preprocessing
from udd_jax.data.preprocessing import fit_preprocessing as fit_preprocessing
from udd_jax.data.preprocessing import resize_images as resize_images
