"""Image quality metrics: PSNR, SSIM, and the bicubic baseline a learned autoencoder
should beat.

```python
from eqx_vae.metrics import psnr, ssim

psnr(image, reconstruction)  # in dB, for images in [-1, 1]
```
"""

from ._metrics import bicubic_baseline as bicubic_baseline, psnr as psnr, ssim as ssim
