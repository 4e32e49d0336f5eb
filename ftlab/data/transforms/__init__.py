"""Data transforms: ``data.transforms`` rewrites the training rows after the split (README, "Data
transforms"). One module per transform, one YAML each in ``conf/transform/``; ``base`` holds the
``Transform`` protocol and the driver, ``nodes`` turns config entries into transforms."""
