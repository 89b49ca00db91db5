"""The queue, the GPU workers, the diffusers pipeline and the PNG writers."""

import logging


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back from torchvision to PIL.

    diffusers' pipeline modules name CLIP and SigLIP image processors, and transformers says
    at each first use, at every start, that torchvision is not installed. The appliance
    needs no torchvision (those processors serve safety checkers and image inputs, which it
    does not use), so the notice asks the operator for nothing: dropped here, before any
    engine module imports diffusers. Every other transformers message still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# transformers logs the notice through this logger (its get_logger is logging.getLogger).
logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
