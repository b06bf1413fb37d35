"""edgeslim device_bench: measure a bundle's latency and memory on the board it will ship on.

    python -m device_bench run dist/NAME --threads 1,2,4 --out reports/local.json
    python -m device_bench remote dist/NAME --host pi@raspberrypi.local --out reports/pi4.json
    python -m device_bench report reports/*.json --out reports/summary
    python -m device_bench profile vgg16 --host pi@raspberrypi.local --out tables/vgg16-pi4.json

The part that runs on the board (run, _worker, _profile_worker, device, bundle, stats, budget,
latency_table) needs only the stdlib, numpy and `runtime`; matplotlib is imported by `report`
alone, and torch/compress/export by `profile`/`probes` alone, on the host.
"""
__version__ = "0.1.0"
