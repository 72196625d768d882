"""Pure positional math: tensors and numbers in, tensors and numbers out, no model in sight."""
