"""The benchmark's client: no compute. Receive, add a constant, send (as the peers' clients)."""

import fedlift.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params={k: v + 1.0 for k, v in model.params.items()}))
