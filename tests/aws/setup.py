# SPDX-License-Identifier: Apache-2.0
"""Set up the moto server for tests/tests/aws.rs, then turn IAM on.

`python setup.py ENDPOINT`: while moto still authorizes nothing, create
the broker's IAM user with an access key and a policy, the role sub-agents
assume, the bucket and its objects; then POST /moto-api/reset-auth with 0,
so that from the next request on every request is authenticated and
authorized (moto's INITIAL_NO_AUTH_ACTION_COUNT). Prints the admin key as
one JSON line.
"""

import json
import sys
import urllib.request

import boto3

endpoint = sys.argv[1]
BUCKET = "project-bucket"
ACCOUNT = "123456789012"


def client(service):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIASETUPSETUPSETUP0",
        aws_secret_access_key="setup-only-not-a-secret",
    )


iam = client("iam")
iam.create_user(UserName="keyward-broker")
key = iam.create_access_key(UserName="keyward-broker")["AccessKey"]
# The admin key may read the whole bucket and derive credentials; the
# broker alone holds it.
iam.put_user_policy(
    UserName="keyward-broker",
    PolicyName="broker",
    PolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
                    "Resource": [
                        f"arn:aws:s3:::{BUCKET}",
                        f"arn:aws:s3:::{BUCKET}/*",
                    ],
                },
                {
                    "Effect": "Allow",
                    "Action": ["sts:AssumeRole", "sts:GetFederationToken"],
                    "Resource": "*",
                },
            ],
        }
    ),
)
# The role sub-agents get: it may read everything under analysis/ (as a
# real reader role would); the broker's session policy narrows it to the
# one object the token pins.
iam.create_role(
    RoleName="agent-reader",
    AssumeRolePolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:user/keyward-broker"},
                    "Action": ["sts:AssumeRole", "sts:SetSourceIdentity"],
                }
            ],
        }
    ),
)
iam.put_role_policy(
    RoleName="agent-reader",
    PolicyName="read-analysis",
    PolicyDocument=json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": "s3:GetObject",
                    "Resource": f"arn:aws:s3:::{BUCKET}/analysis/*",
                }
            ],
        }
    ),
)
s3 = client("s3")
s3.create_bucket(Bucket=BUCKET)
s3.put_object(Bucket=BUCKET, Key="analysis/file.txt", Body=b"the one object\n")
s3.put_object(Bucket=BUCKET, Key="analysis/sibling.txt", Body=b"the sibling\n")

request = urllib.request.Request(
    f"{endpoint}/moto-api/reset-auth",
    data=b"0",
    method="POST",
    # Not a form, or Flask reads the body as one and moto sees nothing.
    headers={"Content-Type": "text/plain"},
)
with urllib.request.urlopen(request) as reply:
    assert json.load(reply)["status"] == "ok"

print(
    json.dumps(
        {
            "access_key_id": key["AccessKeyId"],
            "secret_access_key": key["SecretAccessKey"],
        }
    )
)
