"""Where training JPEGs are decoded (data.decode): "worker" (DataLoader workers, on the CPU) or "device" (the main
process, on the GPU: pipeline/device_decode.py). A plain list, so config.py checks the key without importing torch."""

DECODE_MODES = ("worker", "device")
