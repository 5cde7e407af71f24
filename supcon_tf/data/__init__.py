"""Data sets, augmentation and tf.data input pipelines for SupCon training."""
