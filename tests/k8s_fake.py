"""A FAKE Kubernetes API server for the tests: no kube-apiserver can run on these machines.

It implements only the endpoints the launcher's Kubernetes backend calls (ConfigMaps,
kubeflow.org/v1 PyTorchJobs, trainer.kubeflow.org/v1alpha1 TrainJobs, pods and pod logs) and
holds objects in memory. Every body it receives is validated the way the real cluster would:
jobs against their CRD schema with unknown fields rejected plus the operator's webhook rules,
ConfigMaps against the Kubernetes schema. Tests set a job's conditions and pods to play the
operator.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jsonschema


class FakeKubernetes:
    def __init__(self, schemas: dict[str, dict]):
        self.schemas = schemas  # by plural: pytorchjobs, trainjobs
        self.configmaps: dict[tuple, dict] = {}
        self.jobs: dict[tuple, dict] = {}
        self.pods: dict[tuple, dict] = {}
        self.logs: dict[tuple, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path) -> None:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}]}))

    def run_job(self, namespace: str, name: str, condition: str, exit_code: int | None = None, log: str = "") -> None:
        """Play the operator: set the job's condition and its first node's pod (a TrainJob
        reports a running JobSet job in jobsStatus; it has no Running condition)."""
        job = self.jobs[(namespace, name)]
        status = {"startTime": "2026-11-24T03:00:00Z", "conditions": []}
        if job["kind"] == "TrainJob":
            if condition == "Running":
                status["jobsStatus"] = [{"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0}]
            else:
                status["conditions"] = [{"type": condition, "status": "True", "reason": f"Job{condition}"}]
            pod_name = f"{name}-node-0-0-x7k2p"
            labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                      "batch.kubernetes.io/job-completion-index": "0"}
            container = "node"
        else:
            status["conditions"] = [{"type": condition, "status": "True", "reason": f"PyTorchJob{condition}"}]
            pod_name = f"{name}-master-0"
            labels = {"training.kubeflow.org/job-name": name, "training.kubeflow.org/replica-type": "master"}
            container = "pytorch"
        job["status"] = status
        pod = {"metadata": {"name": pod_name, "namespace": namespace, "labels": labels},
               "spec": {"nodeName": "gpu-node-1"}, "status": {"containerStatuses": []}}
        if exit_code is not None:
            pod["status"]["containerStatuses"] = [{"name": container, "state": {"terminated": {"exitCode": exit_code}}}]
        self.pods[(namespace, pod_name)] = pod
        self.logs[(namespace, pod_name)] = log

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body) -> None:
                data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def status(self, code: int, message: str) -> None:
                self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "code": code})

            def body(self) -> dict:
                return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def route(self, method: str) -> None:
                url = urlparse(self.path)
                fake.requests.append((method, url.path))
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps(?:/([^/]+))?", url.path)
                if m:
                    return self.configmap(method, m.group(1), m.group(2))
                m = re.fullmatch(r"/apis/(?:kubeflow.org/v1|trainer.kubeflow.org/v1alpha1)/namespaces/([^/]+)/"
                                 r"(pytorchjobs|trainjobs)(?:/([^/]+))?", url.path)
                if m and m.group(2) in fake.schemas:
                    return self.job(method, m.group(1), m.group(2), m.group(3))
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)
                if m and method == "GET":
                    selector = dict(p.split("=") for p in parse_qs(url.query).get("labelSelector", [""])[0].split(",")
                                    if "=" in p)
                    items = [p for (ns, _), p in fake.pods.items() if ns == m.group(1)
                             and all(p["metadata"]["labels"].get(k) == v for k, v in selector.items())]
                    return self.reply(200, {"kind": "PodList", "apiVersion": "v1", "items": items})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", url.path)
                if m and method == "GET":
                    return self.reply(200, fake.logs.get((m.group(1), m.group(2)), ""))
                self.status(404, f"the fake API server does not implement {method} {url.path}")

            def configmap(self, method, namespace, name):
                if method == "POST":
                    import kubernetes_validate

                    body = self.body()
                    try:
                        kubernetes_validate.validate(body, "1.33.0", strict=True)
                    except kubernetes_validate.ValidationError as err:
                        return self.status(422, f"ConfigMap is invalid: {err.message}")
                    key = (namespace, body["metadata"]["name"])
                    if key in fake.configmaps:
                        return self.status(409, f'configmaps "{key[1]}" already exists')
                    fake.configmaps[key] = body
                    return self.reply(201, body)
                if method == "DELETE":
                    if fake.configmaps.pop((namespace, name), None) is None:
                        return self.status(404, f'configmaps "{name}" not found')
                    return self.reply(200, {"kind": "Status", "status": "Success"})
                self.status(405, "method not allowed")

            def job(self, method, namespace, plural, name):
                from launcher.backends import kubernetes, trainjob

                kind = {"pytorchjobs": "PyTorchJob", "trainjobs": "TrainJob"}[plural]
                webhook = {"pytorchjobs": kubernetes.webhook_problems, "trainjobs": trainjob.webhook_problems}[plural]
                if method == "POST":
                    body = self.body()
                    try:
                        jsonschema.validate(body, fake.schemas[plural])
                    except jsonschema.ValidationError as err:
                        return self.status(422, f"{kind} is invalid: {err.message}")
                    problems = webhook(body)
                    if problems:
                        return self.status(403, "admission webhook denied the request: " + "; ".join(problems))
                    key = (namespace, body["metadata"]["name"])
                    if key in fake.jobs:
                        return self.status(409, f'{plural} "{key[1]}" already exists')
                    fake.jobs[key] = body
                    return self.reply(201, body)
                found = fake.jobs.get((namespace, name))
                if found is not None and found["kind"] != kind:
                    found = None
                if method == "GET":
                    return self.reply(200, found) if found else self.status(404, f'{plural} "{name}" not found')
                if method == "DELETE":
                    if found is None:
                        return self.status(404, f'{plural} "{name}" not found')
                    del fake.jobs[(namespace, name)]
                    return self.reply(200, {"kind": "Status", "status": "Success"})
                self.status(405, "method not allowed")

            def do_GET(self):
                self.route("GET")

            def do_POST(self):
                self.route("POST")

            def do_DELETE(self):
                self.route("DELETE")

        return Handler
