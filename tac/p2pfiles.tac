# An example deployment of one p2pfiles node, for `twistd -ny tac/p2pfiles.tac`.
# It builds the same service as `twistd p2pfiles` from the values below: edit
# them, or set the environment variables named beside them.
import os

from twisted.application.service import Application

from p2pfiles.tap import Options, makeService

NODE_ID = os.environ.get("P2PFILES_ID", "1")
PORT = os.environ.get("P2PFILES_PORT", str(9000 + int(NODE_ID)))
PEERS = os.environ.get("P2PFILES_PEERS", "1@127.0.0.1:9001 2@127.0.0.1:9002 3@127.0.0.1:9003")
SHARE = os.environ.get("P2PFILES_SHARE", f"node{NODE_ID}/files")
STATE = os.environ.get("P2PFILES_STATE", f"node{NODE_ID}/state")
SECRET_FILE = os.environ.get("P2PFILES_SECRET_FILE", "")

arguments = ["--id", NODE_ID, "--port", PORT, "--share", SHARE, "--state", STATE]
for peer in PEERS.split():
    if peer.split("@", 1)[0] != NODE_ID:
        arguments += ["--peer", peer]
if SECRET_FILE:
    arguments += ["--secret-file", SECRET_FILE]

options = Options()
options.parseOptions(arguments)

application = Application("p2pfiles")
makeService(options).setServiceParent(application)
