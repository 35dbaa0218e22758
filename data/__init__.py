"""Videos, dataset layouts, manifests, splits, the HDF5 store, clip datasets and augmentation."""
