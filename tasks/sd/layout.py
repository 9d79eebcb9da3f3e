"""File names of the training outputs, shared by the exporter that writes them and the stages that load them
(without importing the exporter, which loads diffusers)."""

SINGLE_FILE = "model.safetensors"  # sd15: the A1111 / ComfyUI single-file checkpoint
DIFFUSERS_DIR = "diffusers"  # sd15: the pipeline folder
LORA_FILE = "pytorch_lora_weights.safetensors"  # sdxl: for load_lora_weights
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # sdxl: the kohya / A1111 layout
