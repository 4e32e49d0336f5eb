"""Parameter-efficient fine-tuning methods: one module + one YAML in conf/peft each."""
