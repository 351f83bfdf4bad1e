"""What `selfsup dashboard` hands to `streamlit run`: the app (app.py) as an ASGI application
behind the token gate (gate.py). Streamlit finds `app` here and serves it with uvicorn."""

import os

from starlette.middleware import Middleware
from streamlit.starlette import App

from selfsup.dashboard import PORT_ENV, TOKEN_ENV
from selfsup.dashboard.gate import TokenGate

app = App(os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py"),
          middleware=[Middleware(TokenGate, token=os.environ.get(TOKEN_ENV, ""), port=int(os.environ.get(PORT_ENV, "0")))])
