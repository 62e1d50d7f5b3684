"""The ClientApp a site runs: its mods (one event per message and generic error replies,
SecAgg+, simulated faults, central-DP clipping) and every message kind it answers, each routed
to its handler by name.

Handlers unpack the message, check what the server sent (client/guard.py), call `hmgdm_core`
and pack arrays + scalar metrics; only names the server sent come back (pretraining.py,
downstream.py, cox.py).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from client import cox, downstream, pretraining
from client.faults import fault_mod
from client.privacy import privacy_mod
from client.report import report_mod
from client.secagg import secagg_mod

# report_mod outermost: whatever fails below, the server gets a category, the site's log the
# detail. secagg_mod next: a SecAgg+ round becomes a plain train message that privacy_mod then
# clips. fault_mod (simulation only) sits outside privacy_mod: a broken site skips the clipping.
app = ClientApp(mods=[report_mod, secagg_mod, fault_mod, privacy_mod])

# Flower's decorators return the function: registering here names every message kind served.
app.query("stats")(pretraining.stats)
app.train()(pretraining.train)
app.evaluate()(pretraining.evaluate)
app.query("entity_moments")(downstream.entity_moments)
app.train("finetune")(downstream.finetune)
app.evaluate("downstream")(downstream.evaluate_downstream)
app.query("cox")(cox.cox)
