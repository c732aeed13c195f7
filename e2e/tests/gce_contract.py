"""The discovery-based Python client (google-api-python-client) against ferry's Compute
Engine fake: create, read, list and delete the resources ferry's GCE provider uses, as a
second real client. Run by e2e/tests/gce_fake.rs with FAKE_URL and DISCOVERY set."""

import json
import os
import sys

import httplib2
from googleapiclient.discovery import build_from_document
from googleapiclient.errors import HttpError

PROJECT, REGION, ZONE = "proj", "us-central1", "us-central1-a"

with open(os.environ["DISCOVERY"]) as f:
    document = json.load(f)
compute = build_from_document(
    document,
    http=httplib2.Http(),
    client_options={"api_endpoint": os.environ["FAKE_URL"] + "/compute/v1/"},
)


def done(op):
    """Waits for a regional or global Operation and fails on its error."""
    if op["status"] != "DONE":
        if "region" in op:
            op = compute.regionOperations().wait(project=PROJECT, region=REGION, operation=op["name"]).execute()
        else:
            op = compute.globalOperations().wait(project=PROJECT, operation=op["name"]).execute()
    assert op["status"] == "DONE", op
    assert "error" not in op, op
    return op


done(compute.addresses().insert(project=PROJECT, region=REGION, body={"name": "py-addr"}).execute())
address = compute.addresses().get(project=PROJECT, region=REGION, address="py-addr").execute()
assert address["status"] == "RESERVED", address
listed = compute.addresses().list(project=PROJECT, region=REGION, filter='name = "py-addr"').execute()
assert [a["name"] for a in listed["items"]] == ["py-addr"], listed

hc = done(compute.httpHealthChecks().insert(project=PROJECT, body={"name": "py-hc", "port": 10256}).execute())
instance = f"{os.environ['FAKE_URL']}/compute/v1/projects/{PROJECT}/zones/{ZONE}/instances/node-a"
pool = done(
    compute.targetPools()
    .insert(project=PROJECT, region=REGION, body={"name": "py-pool", "instances": [instance], "healthChecks": [hc["targetLink"]]})
    .execute()
)
done(
    compute.forwardingRules()
    .insert(
        project=PROJECT,
        region=REGION,
        body={"name": "py-rule", "IPAddress": address["address"], "IPProtocol": "UDP", "portRange": "53-53", "target": pool["targetLink"]},
    )
    .execute()
)

try:
    compute.addresses().insert(project=PROJECT, region=REGION, body={"name": "py-addr"}).execute()
    sys.exit("a duplicate name was accepted")
except HttpError as e:
    assert e.resp.status == 409, e
    assert e.error_details[0]["reason"] == "alreadyExists", e.error_details

done(compute.forwardingRules().delete(project=PROJECT, region=REGION, forwardingRule="py-rule").execute())
done(compute.targetPools().delete(project=PROJECT, region=REGION, targetPool="py-pool").execute())
done(compute.httpHealthChecks().delete(project=PROJECT, httpHealthCheck="py-hc").execute())
done(compute.addresses().delete(project=PROJECT, region=REGION, address="py-addr").execute())
print("ok")
