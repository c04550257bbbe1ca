//! Manifests: cellplane's own YAML and — so service teams can bring what they have — Kubernetes
//! `Deployment`, `StatefulSet` and `Pod`, and KubeVirt `VirtualMachine`, mapped to workloads.
//!
//! A field with no mapping is an error naming it, never dropped in silence. What maps:
//!
//! | source | cellplane |
//! | --- | --- |
//! | `metadata.name` | name |
//! | `metadata.labels`, `metadata.annotations`, `metadata.namespace`, `spec.selector`, `spec.template.metadata` | identity only: a workload owns its replicas |
//! | Deployment / StatefulSet / Pod | replicated / stateful / replicated with one replica |
//! | `spec.replicas` | replicas |
//! | the one container's `image`, `command` + `args`, `env[].name/value` | container image, command, environment |
//! | `resources.requests` (else `limits`) `cpu`, `memory`, `nvidia.com/gpu` | resources per replica |
//! | container `name`, `ports`, `imagePullPolicy` | identity and information only |
//! | VirtualMachine `runStrategy` / `running` | power (Halted/false → off) |
//! | `domain.cpu.cores`, `domain.memory.guest` or `domain.resources.requests.memory` | vCPUs, memory |
//! | `volumes[].containerDisk.image`, `cloudInitNoCloud.userData(Base64)` | VM image, cloud-init |
//! | `domain.devices.disks/interfaces`, `networks` naming those volumes | identity only |
//!
//! Own format: `apiVersion: cellplane/v1`, `kind: Workload`, `spec:` a workload spec.

use cellplane_api::{
    ContainerSpec, Controller, PowerState, Resources, Validate, VmSpec, WorkloadKind, WorkloadName,
    WorkloadSpec,
};
use serde_json::Value;

/// Why a manifest could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", .document.map(|d| format!("document {d}: ")).unwrap_or_default(), .field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct ManifestError {
    /// Which document of the file (1-based), when known.
    pub document: Option<usize>,
    /// The field, as a path (`spec.template.spec.containers[0].image`), when there is one.
    pub field: Option<String>,
    /// What is wrong (YAML syntax errors carry their line and column).
    pub message: String,
}

fn err(document: usize, field: &str, message: impl Into<String>) -> ManifestError {
    ManifestError { document: Some(document), field: Some(field.into()), message: message.into() }
}

/// Reads every document of a YAML manifest. All or nothing: one bad document fails the whole.
pub fn parse(text: &str) -> Result<Vec<WorkloadSpec>, ManifestError> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| ManifestError {
        document: None,
        field: None,
        message: e.to_string(),
    })?;
    let mut specs: Vec<WorkloadSpec> = Vec::new();
    for (i, document) in documents.into_iter().enumerate() {
        let n = i + 1;
        if document.is_null() {
            continue; // an empty document between separators
        }
        let spec = map(n, &document)?;
        spec.validate().map_err(|e| err(n, "spec", e.to_string()))?;
        if specs.iter().any(|s| s.name == spec.name) {
            return Err(err(
                n,
                "metadata.name",
                format!("{} appears twice in this file", spec.name),
            ));
        }
        specs.push(spec);
    }
    if specs.is_empty() {
        return Err(ManifestError { document: None, field: None, message: "no workloads".into() });
    }
    Ok(specs)
}

fn map(n: usize, doc: &Value) -> Result<WorkloadSpec, ManifestError> {
    let object = doc.as_object().ok_or_else(|| err(n, "", "a document must be a mapping"))?;
    let text = |key: &str| object.get(key).and_then(Value::as_str).unwrap_or_default();
    match (text("apiVersion"), text("kind")) {
        ("cellplane/v1", "Workload") => {
            only(n, "", object, &["apiVersion", "kind", "spec"])?;
            let spec = object.get("spec").cloned().ok_or_else(|| err(n, "spec", "missing"))?;
            serde_json::from_value(spec).map_err(|e| err(n, "spec", e.to_string()))
        }
        ("apps/v1", "Deployment") => workload(n, object, Controller::Replicated, true),
        ("apps/v1", "StatefulSet") => workload(n, object, Controller::Stateful, true),
        ("v1", "Pod") => workload(n, object, Controller::Replicated, false),
        ("kubevirt.io/v1", "VirtualMachine") => virtual_machine(n, object),
        ("", _) | (_, "") => Err(err(n, "apiVersion", "apiVersion and kind are required")),
        (api, kind) => Err(err(n, "kind", format!("{api} {kind} has no mapping in cellplane"))),
    }
}

type Object = serde_json::Map<String, Value>;

/// Refuses any key of `object` outside `allowed`, naming it.
fn only(n: usize, at: &str, object: &Object, allowed: &[&str]) -> Result<(), ManifestError> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(key) => Err(err(n, &join(at, key), "no mapping in cellplane")),
        None => Ok(()),
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() { key.into() } else { format!("{at}.{key}") }
}

fn object<'a>(n: usize, at: &str, value: Option<&'a Value>) -> Result<&'a Object, ManifestError> {
    value.and_then(Value::as_object).ok_or_else(|| err(n, at, "missing, or not a mapping"))
}

fn name(n: usize, object: &Object) -> Result<WorkloadName, ManifestError> {
    let metadata = self::object(n, "metadata", object.get("metadata"))?;
    only(n, "metadata", metadata, &["name", "labels", "annotations", "namespace"])?;
    let name = metadata.get("name").and_then(Value::as_str).unwrap_or_default();
    WorkloadName::new(name).map_err(|e| err(n, "metadata.name", e.to_string()))
}

fn workload(
    n: usize,
    doc: &Object,
    controller: Controller,
    templated: bool,
) -> Result<WorkloadSpec, ManifestError> {
    only(n, "", doc, &["apiVersion", "kind", "metadata", "spec"])?;
    let name = name(n, doc)?;
    let spec = object(n, "spec", doc.get("spec"))?;
    let (pod, at, replicas) = if templated {
        let allowed = ["replicas", "selector", "template", "serviceName"];
        only(n, "spec", spec, &allowed)?;
        let replicas = match spec.get("replicas") {
            None => 1,
            Some(v) => v
                .as_u64()
                .and_then(|r| u32::try_from(r).ok())
                .ok_or_else(|| err(n, "spec.replicas", "must be a whole number"))?,
        };
        let template = object(n, "spec.template", spec.get("template"))?;
        only(n, "spec.template", template, &["metadata", "spec"])?;
        (object(n, "spec.template.spec", template.get("spec"))?, "spec.template.spec", replicas)
    } else {
        (spec, "spec", 1)
    };
    only(n, at, pod, &["containers"])?;
    let containers = pod
        .get("containers")
        .and_then(Value::as_array)
        .ok_or_else(|| err(n, &join(at, "containers"), "missing"))?;
    let [container] = containers.as_slice() else {
        let why = format!(
            "{} containers in one pod have no mapping (one per workload)",
            containers.len()
        );
        return Err(err(n, &join(at, "containers"), why));
    };
    let at = format!("{at}.containers[0]");
    let container = object(n, &at, Some(container))?;
    let allowed =
        ["name", "image", "command", "args", "env", "resources", "ports", "imagePullPolicy"];
    only(n, &at, container, &allowed)?;
    let image = container.get("image").and_then(Value::as_str).unwrap_or_default().to_string();
    let strings = |key: &str| -> Result<Vec<String>, ManifestError> {
        match container.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| err(n, &join(&at, key), "must be a list of strings")),
            Some(_) => Err(err(n, &join(&at, key), "must be a list of strings")),
        }
    };
    let mut command = strings("command")?;
    command.extend(strings("args")?);
    let mut env = std::collections::BTreeMap::new();
    for (i, item) in
        container.get("env").and_then(Value::as_array).into_iter().flatten().enumerate()
    {
        let field = format!("{at}.env[{i}]");
        let item = object(n, &field, Some(item))?;
        only(n, &field, item, &["name", "value"])?;
        let key =
            item.get("name").and_then(Value::as_str).ok_or_else(|| err(n, &field, "no name"))?;
        let value = item.get("value").map(scalar).unwrap_or_default();
        env.insert(key.to_string(), value);
    }
    let resources = match container.get("resources") {
        None => Resources { cpu_milli: 100, memory_mib: 128, disk_gib: 0, gpus: 0 },
        Some(r) => requests(n, &format!("{at}.resources"), object(n, &at, Some(r))?)?,
    };
    Ok(WorkloadSpec {
        name,
        kind: WorkloadKind::Container(ContainerSpec { image, command, env }),
        controller,
        replicas,
        resources,
        placement: Default::default(),
        update: Default::default(),
    })
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `requests` (else `limits`): cpu, memory, GPUs.
fn requests(n: usize, at: &str, resources: &Object) -> Result<Resources, ManifestError> {
    only(n, at, resources, &["requests", "limits"])?;
    let source = resources.get("requests").or_else(|| resources.get("limits"));
    let key = if resources.contains_key("requests") { "requests" } else { "limits" };
    let at = join(at, key);
    let amounts = object(n, &at, source)?;
    only(n, &at, amounts, &["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"])?;
    let cpu = match amounts.get("cpu") {
        None => 100,
        Some(v) => {
            cpu_milli(&scalar(v)).ok_or_else(|| err(n, &join(&at, "cpu"), "not a CPU amount"))?
        }
    };
    let memory = match amounts.get("memory") {
        None => 128,
        Some(v) => mebibytes(&scalar(v))
            .ok_or_else(|| err(n, &join(&at, "memory"), "not a memory amount"))?,
    };
    let disk = match amounts.get("ephemeral-storage") {
        None => 0,
        Some(v) => mebibytes(&scalar(v))
            .map(|m| m.div_ceil(1_024))
            .ok_or_else(|| err(n, &join(&at, "ephemeral-storage"), "not a size"))?,
    };
    let gpus = match amounts.get("nvidia.com/gpu") {
        None => 0,
        Some(v) => scalar(v)
            .parse::<u8>()
            .map_err(|_| err(n, &join(&at, "nvidia.com/gpu"), "not a GPU count"))?,
    };
    Ok(Resources { cpu_milli: cpu, memory_mib: memory, disk_gib: disk, gpus })
}

/// `"500m"` → 500, `"2"` → 2000, `"0.5"` → 500.
pub fn cpu_milli(text: &str) -> Option<u32> {
    if let Some(milli) = text.strip_suffix('m') {
        return milli.parse().ok();
    }
    let cores: f64 = text.parse().ok()?;
    (0.0..=1e6).contains(&cores).then(|| (cores * 1_000.0).round() as u32)
}

/// `"256Mi"` → 256, `"1Gi"` → 1024, `"64M"` → 62, `"1G"` → 954: MiB, rounded up.
pub fn mebibytes(text: &str) -> Option<u32> {
    let (digits, unit) =
        text.split_at(text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len()));
    let number: f64 = digits.parse().ok()?;
    let bytes = number
        * match unit {
            "" => 1.0,
            "Ki" => 1_024.0,
            "Mi" => 1_048_576.0,
            "Gi" => 1_073_741_824.0,
            "Ti" => 1_099_511_627_776.0,
            "k" | "K" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            _ => return None,
        };
    let mib = (bytes / 1_048_576.0).ceil();
    (0.0..=f64::from(u32::MAX)).contains(&mib).then_some(mib as u32)
}

fn virtual_machine(n: usize, doc: &Object) -> Result<WorkloadSpec, ManifestError> {
    only(n, "", doc, &["apiVersion", "kind", "metadata", "spec"])?;
    let name = name(n, doc)?;
    let spec = object(n, "spec", doc.get("spec"))?;
    only(n, "spec", spec, &["runStrategy", "running", "template"])?;
    let power = match (spec.get("runStrategy").and_then(Value::as_str), spec.get("running")) {
        (Some("Halted"), _) | (None, Some(Value::Bool(false))) => PowerState::Off,
        (Some("Always" | "RerunOnFailure" | "Once"), _)
        | (None, Some(Value::Bool(true)) | None) => PowerState::On,
        (Some(other), _) => {
            return Err(err(n, "spec.runStrategy", format!("{other} has no mapping")));
        }
        (None, Some(_)) => return Err(err(n, "spec.running", "must be true or false")),
    };
    let template = object(n, "spec.template", spec.get("template"))?;
    only(n, "spec.template", template, &["metadata", "spec"])?;
    let at = "spec.template.spec";
    let vm = object(n, at, template.get("spec"))?;
    only(n, at, vm, &["domain", "volumes", "networks"])?;
    let domain = object(n, "spec.template.spec.domain", vm.get("domain"))?;
    only(n, "spec.template.spec.domain", domain, &["cpu", "memory", "resources", "devices"])?;
    let vcpus = match domain.get("cpu") {
        None => 1,
        Some(cpu) => {
            let cpu = object(n, "spec.template.spec.domain.cpu", Some(cpu))?;
            only(n, "spec.template.spec.domain.cpu", cpu, &["cores"])?;
            cpu.get("cores")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(1)
        }
    };
    let guest = domain.get("memory").and_then(|m| m.get("guest")).map(scalar);
    let requested = domain
        .get("resources")
        .and_then(|r| r.get("requests"))
        .and_then(|r| r.get("memory"))
        .map(scalar);
    if let Some(memory) = domain.get("memory").and_then(Value::as_object) {
        only(n, "spec.template.spec.domain.memory", memory, &["guest"])?;
    }
    if let Some(resources) = domain.get("resources").and_then(Value::as_object) {
        only(n, "spec.template.spec.domain.resources", resources, &["requests"])?;
        if let Some(r) = resources.get("requests").and_then(Value::as_object) {
            only(n, "spec.template.spec.domain.resources.requests", r, &["memory"])?;
        }
    }
    let memory_mib = match guest.or(requested) {
        None => 512,
        Some(text) => mebibytes(&text)
            .ok_or_else(|| err(n, "spec.template.spec.domain.memory", "not a memory amount"))?,
    }
    .max(64);
    let mut image = None;
    let mut cloud_init = None;
    for (i, volume) in vm.get("volumes").and_then(Value::as_array).into_iter().flatten().enumerate()
    {
        let field = format!("spec.template.spec.volumes[{i}]");
        let volume = object(n, &field, Some(volume))?;
        only(n, &field, volume, &["name", "containerDisk", "cloudInitNoCloud"])?;
        if let Some(disk) = volume.get("containerDisk") {
            image = disk.get("image").and_then(Value::as_str).map(String::from);
        }
        if let Some(init) = volume.get("cloudInitNoCloud") {
            let init = object(n, &field, Some(init))?;
            only(n, &format!("{field}.cloudInitNoCloud"), init, &["userData", "userDataBase64"])?;
            cloud_init = init.get("userData").or_else(|| init.get("userDataBase64")).map(scalar);
        }
    }
    let image = image
        .ok_or_else(|| err(n, "spec.template.spec.volumes", "no containerDisk image to boot"))?;
    Ok(WorkloadSpec {
        name,
        kind: WorkloadKind::Vm(VmSpec {
            image,
            vcpus,
            memory_mib,
            disk_gib: 10,
            cloud_init,
            power,
        }),
        controller: Controller::Stateful,
        replicas: 1,
        resources: Resources {
            cpu_milli: u32::from(vcpus) * 1_000,
            memory_mib,
            disk_gib: 10,
            gpus: 0,
        },
        placement: Default::default(),
        update: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_convert_like_kubernetes() {
        assert_eq!(cpu_milli("500m"), Some(500));
        assert_eq!(cpu_milli("2"), Some(2_000));
        assert_eq!(cpu_milli("0.25"), Some(250));
        assert_eq!(cpu_milli("lots"), None);
        assert_eq!(mebibytes("256Mi"), Some(256));
        assert_eq!(mebibytes("1Gi"), Some(1_024));
        assert_eq!(mebibytes("64M"), Some(62));
        assert_eq!(mebibytes("16Gi"), Some(16_384));
        assert_eq!(mebibytes("12Q"), None);
    }

    #[test]
    fn a_deployment_maps_and_an_unmapped_field_is_named() {
        let yaml = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {app: web}\nspec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - name: web\n        image: nginx:1\n        args: [\"-g\", \"daemon off;\"]\n        env: [{name: MODE, value: prod}]\n        resources: {requests: {cpu: 250m, memory: 64Mi}}\n";
        let specs = parse(yaml).unwrap();
        assert_eq!(specs[0].replicas, 3);
        assert_eq!(specs[0].resources.cpu_milli, 250);
        let probe = yaml.replace("        args:", "        livenessProbe: {}\n        args:");
        let e = parse(&probe).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.template.spec.containers[0].livenessProbe"));
        assert!(e.to_string().contains("no mapping"), "{e}");
    }

    #[test]
    fn a_multi_document_file_is_all_or_nothing() {
        let good = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: a, image: x}]}\n";
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\n";
        let e = parse(&format!("{good}---\n{bad}")).unwrap_err();
        assert_eq!(e.document, Some(2));
        assert!(e.to_string().contains("v1 Service has no mapping"), "{e}");
        let twice = parse(&format!("{good}---\n{good}")).unwrap_err();
        assert!(twice.to_string().contains("appears twice"));
    }

    #[test]
    fn broken_yaml_and_wrong_types_are_errors_with_places() {
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: [\n").unwrap_err();
        assert!(e.message.contains("line"), "{e}");
        let e = parse(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: w}\nspec: {replicas: many}\n",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec.replicas"));
    }
}
