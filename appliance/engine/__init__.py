"""The queue, the GPU workers, the diffusers pipeline and the PNG writers."""
