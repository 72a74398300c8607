"""Image quality metrics: PSNR, SSIM, the bicubic baseline a learned autoencoder
should beat, and a colour chart to check its colours on.

```python
from eqx_vae.metrics import psnr, ssim

psnr(image, reconstruction)  # in dB, for images in [-1, 1]
```
"""

from ._metrics import (
    COLOUR_CHART as COLOUR_CHART,
    bicubic_baseline as bicubic_baseline,
    colour_chart as colour_chart,
    colour_chart_errors as colour_chart_errors,
    flat_colours as flat_colours,
    psnr as psnr,
    ssim as ssim,
)
