"""Ray Serve entry for `serve run` / `serve deploy` (the code lives in detailfusion.serving.app):

    serve run deploy.app:app checkpoint=runs/tiny/stage3/model index=runs/tiny/index
    serve run deploy/config.yaml
"""

from detailfusion.serving.app import app_builder as app  # noqa: F401  (an application builder: args -> app)
