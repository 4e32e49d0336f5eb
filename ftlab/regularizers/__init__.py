"""Fine-tuning regularisers: one module + one YAML in conf/regularizer each."""
