# An example deployment of one p2pfiles node, for
#
#   twistd -n --pidfile= -y tac/p2pfiles.tac
#
# It builds the same service as `twistd p2pfiles`, with the same choices:
# every option of the plugin can be set here by an environment variable
# named after it, P2PFILES_ plus the option in capitals with "_" for "-":
#
#   P2PFILES_ID              --id (default 1)
#   P2PFILES_PORT            --port
#   P2PFILES_INTERFACE       --interface
#   P2PFILES_ADVERTISE       --advertise
#   P2PFILES_CLUSTER         --cluster
#   P2PFILES_PEERS           --peer, space-separated (the node's own entry is
#                            skipped; unset: the three local nodes 9001-9003,
#                            unless P2PFILES_CLUSTER is set; empty: none)
#   P2PFILES_SHARE           --share
#   P2PFILES_STATE           --state
#   P2PFILES_SECRET_FILE     --secret-file (empty: no secret)
#   P2PFILES_TLS_CERT        --tls-cert
#   P2PFILES_TLS_KEY         --tls-key
#   P2PFILES_HEARTBEAT       --heartbeat
#   P2PFILES_LEADER_TIMEOUT  --leader-timeout
#   P2PFILES_WEB             --web
#   P2PFILES_WEB_TOKEN_FILE  --web-token-file
#   P2PFILES_PART_MAX_AGE    --part-max-age
#
# and P2PFILES_ARGS holds any further plugin options, split as a shell
# would. An empty variable other than P2PFILES_PEERS counts as unset. Options the plugin gains later
# are picked up by name. Edit DEFAULTS below to change what applies when a
# variable is unset.
import os
import shlex

from twisted.application.service import Application
from twisted.python import usage

from p2pfiles.tap import Options, makeService

DEFAULTS = {
    "id": "1",
    "peers": "1@127.0.0.1:9001 2@127.0.0.1:9002 3@127.0.0.1:9003",
}


def setting(name):
    """
    The value for the plugin option C{name}: its environment variable if
    set and not empty, else DEFAULTS, else None.
    """
    value = os.environ.get("P2PFILES_" + name.upper().replace("-", "_"), "")
    return value or DEFAULTS.get(name)


NODE_ID = setting("id")
arguments = ["--id", NODE_ID]
for option in Options.optParameters:
    name = option[0]
    value = None if name == "id" else setting(name)
    if value is not None:
        arguments += [f"--{name}", value]
peers = os.environ.get("P2PFILES_PEERS", "" if setting("cluster") else DEFAULTS["peers"])
for peer in peers.split():
    if peer.split("@", 1)[0] != NODE_ID:
        arguments += ["--peer", peer]
arguments += shlex.split(os.environ.get("P2PFILES_ARGS", ""))

options = Options()
try:
    options.parseOptions(arguments)
except usage.UsageError as e:
    # One line, as the plugin gives, not a traceback.
    raise SystemExit(f"p2pfiles.tac: {e}") from None

application = Application("p2pfiles")
makeService(options).setServiceParent(application)
