"""Everything between a user's input and the model's tensors: items, images, text, batching, tiling."""
