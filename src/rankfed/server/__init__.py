"""The transport-neutral server side of a run, shared by the simulator and Flower.

* :mod:`.round` - sampling, the downlink plan, checked aggregation, the byte ledger, records, evaluation;
* :mod:`.validate` - every upload checked before the server uses it;
* :mod:`.defence` - trusted weights, bounded uploads, robust aggregation, differential privacy;
* :mod:`.experiment` - an experiment resolved for a transport (:class:`Experiment`, :class:`RunOptions`);
* :mod:`.runfolder` - the run folder every front end writes.
"""

from rankfed.server.defence import Defences, PrivacyLedger, private_client, resolve_noise
from rankfed.server.experiment import EXECUTIONS, Experiment, RunOptions
from rankfed.server.round import CatchUp, Downlink, Evaluator, RoundRecord, Rounds, aggregate_round, sample_clients, upload_limit
from rankfed.server.runfolder import CLIENT_STATE_DIR, RESUME_FILE, RunFolder, dumps, summarize
from rankfed.server.validate import aggregate_checked, check_upload

__all__ = [
    "Experiment",
    "RunOptions",
    "EXECUTIONS",
    "Rounds",
    "Downlink",
    "CatchUp",
    "RoundRecord",
    "Evaluator",
    "aggregate_round",
    "sample_clients",
    "upload_limit",
    "RunFolder",
    "summarize",
    "dumps",
    "RESUME_FILE",
    "CLIENT_STATE_DIR",
    "aggregate_checked",
    "check_upload",
    "Defences",
    "PrivacyLedger",
    "private_client",
    "resolve_noise",
]
