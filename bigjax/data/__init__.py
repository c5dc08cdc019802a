"""Input pipelines: TFDS data sources (array_record, no TensorFlow) read into host numpy arrays."""
