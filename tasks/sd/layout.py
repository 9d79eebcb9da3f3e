"""File names of the training outputs and exports, shared by the stages that write them and those that load them
(without importing the exporter, which loads diffusers)."""

WEIGHTS_DIR = "weights"  # in a train (or select) entry: the trained weights, as sample steps keep theirs
MODEL_DIR = "model"  # in the export entry: what one uploads to the hub (weights and model card), nothing else
SINGLE_FILE = "model.safetensors"  # sd15: the A1111 / ComfyUI single-file checkpoint, beside the pipeline's folders
LORA_FILE = "pytorch_lora_weights.safetensors"  # sdxl: the name load_lora_weights looks for by default
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # sdxl: the kohya / A1111 layout
SELECTION_FILE = "selection.json"  # in a select entry: which step a best pick chose, and every candidate's score
