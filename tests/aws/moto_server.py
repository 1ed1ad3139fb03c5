# SPDX-License-Identifier: Apache-2.0
"""moto in server mode, for tests/tests/aws.rs, with one AWS rule moto lacks.

moto (5.x) authorizes a request made with AssumeRole credentials by the
role's policies alone: it stores the session policy passed to AssumeRole
but never evaluates it. In AWS the effective permissions are the
intersection of both. That intersection is what the keyward broker's
session policy relies on, so this wrapper adds it, using moto's own policy
evaluator, before starting the unmodified moto server:
`python moto_server.py -H 127.0.0.1 -p PORT`.
"""

import sys

from moto.iam import access_control
from moto.sts.models import sts_backends

_moto_check = access_control.IAMRequestBase.check_action_permitted


def _session_policy(access_key):
    if not isinstance(access_key, access_control.AssumedRoleAccessKey):
        return None
    backend = sts_backends[access_key.account_id][access_key.partition]
    for role in backend.assumed_roles:
        if role.access_key_id == access_key._access_key_id:
            return role.policy
    return None


def check_action_permitted(self, resource):
    _moto_check(self, resource)
    if self._action == "sts:GetCallerIdentity":
        return  # AWS allows it whatever the policies say; so does moto
    policy = _session_policy(self._access_key)
    if policy:
        result = access_control.IAMPolicy(policy).is_action_permitted(
            self._action, resource
        )
        if result != access_control.PermissionResult.PERMITTED:
            self._raise_access_denied()


access_control.IAMRequestBase.check_action_permitted = check_action_permitted

if __name__ == "__main__":
    from moto.server import main

    main(sys.argv[1:])
