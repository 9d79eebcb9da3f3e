"""File names of the training outputs, shared by the exporter that writes them and the stages that load them
(without importing the exporter, which loads diffusers)."""

MODEL_DIR = "model"  # in the train entry: what one uploads to the hub (weights and model card), nothing else
SINGLE_FILE = "model.safetensors"  # sd15: the A1111 / ComfyUI single-file checkpoint, beside the pipeline's folders
LORA_FILE = "pytorch_lora_weights.safetensors"  # sdxl: the name load_lora_weights looks for by default
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # sdxl: the kohya / A1111 layout
