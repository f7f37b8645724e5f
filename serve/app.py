"""Ray Serve entry for `serve run` / `serve deploy` (the code lives in detailfusion.platform.serving.app):

    serve run serve.app:app checkpoint=runs/tiny/stage3/model index=runs/tiny/index
    serve run serve/config.yaml
"""

from detailfusion.platform.serving.app import app_builder as app  # noqa: F401  (an application builder: args -> app)
