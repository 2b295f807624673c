"""The adapterserve Ray Serve application, for `serve run deploy.ray_serve:app` and `serve deploy`.

Settings come from the environment as for the single server (`ADAPTERSERVE_*`, the AWS variables of
an `s3://` store), scaling from `ADAPTERSERVE_RAY_*` (see service/ray_app.py and docs/deploy.md).
"""

from service.ray_app import build_app

app = build_app()
