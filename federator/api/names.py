"""The names of a Federation's children, and the one name limit that follows from them.

Used by the API models (`federator validate`, the operator), by the CRD's CEL rule (`kubectl apply`) and
by the operator's child builders, so the three can never disagree on what fits.
"""

from __future__ import annotations

LABEL_VALUE_MAX = 63  # a DNS label, and a label value

# `<name><suffix>` for each child of a Federation (a FederatedClient's Deployment is `<client>-silo`)
SERVER, CLIENTS, CONFIG, CREDENTIALS, SILO = "-server", "-clients", "-config", "-credentials", "-silo"
# a StatefulSet's pods carry the label `controller-revision-hash: <statefulset>-<hash of up to 10 chars>`
STATEFULSET_REVISION_LABEL = 1 + 10

# The longest text built from a name that must fit in a label value: the server StatefulSet's revision label.
LONGEST_SUFFIX = max(len(SERVER) + STATEFULSET_REVISION_LABEL, len(CLIENTS), len(CONFIG), len(CREDENTIALS), len(SILO))
MAX_NAME_LENGTH = LABEL_VALUE_MAX - LONGEST_SUFFIX  # 45
