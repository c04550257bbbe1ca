//! Real manifests we did not write: copies of three in `tests/manifests/` (their sources in
//! `SOURCES.tsv`), and the whole shared corpus when it is next to the checkout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use cellplane_sdk::manifest::parse;
use cellplane_sdk::model::{Controller, PowerState, WorkloadKind};

fn read(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests").join(name),
    )
    .unwrap()
}

#[test]
fn a_kubevirt_vm_maps_to_a_powered_off_stateful_vm() {
    let specs = parse(&read("kubevirt_kubevirt.github.io__vm.yaml")).unwrap();
    assert_eq!(specs.len(), 1);
    let vm = &specs[0];
    assert_eq!(vm.name.as_str(), "testvm");
    assert_eq!(vm.controller, Controller::Stateful);
    let WorkloadKind::Vm(v) = &vm.kind else { panic!("not a VM") };
    assert_eq!(v.image, "quay.io/kubevirt/cirros-container-disk-demo");
    assert_eq!(v.power, PowerState::Off, "runStrategy: Halted");
    assert_eq!(v.memory_mib, 64, "64M is 61.04 MiB, raised to the VM minimum");
    assert!(v.cloud_init.is_some());
}

#[test]
fn fields_without_a_mapping_are_named_not_dropped() {
    let e = parse(&read("alibaba_open-simulator__deploy-webapp.yaml")).unwrap_err();
    assert_eq!(e.document, Some(1));
    // Its first unmapped field, in key order (affinity, terminationGracePeriodSeconds, ...).
    assert_eq!(e.field.as_deref(), Some("spec.template.spec.affinity"));
    let e = parse(&read("kubernetes_examples__vllm-deployment.yaml")).unwrap_err();
    assert!(e.field.as_deref().unwrap().starts_with("spec.template.spec"), "{e}");
}

/// Every manifest of the shared corpus either maps or is refused with a field or a reason;
/// none panics. Skipped, saying so, where the corpus is not beside the checkout.
#[test]
fn the_whole_corpus_maps_or_is_refused_with_a_reason() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/manifests");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        println!("skipped: no corpus at {}", dir.display());
        return;
    };
    let (mut mapped, mut refused) = (0, 0);
    for entry in entries {
        let path = entry.unwrap().path();
        if !matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            continue;
        }
        match parse(&std::fs::read_to_string(&path).unwrap()) {
            Ok(specs) => mapped += specs.len(),
            Err(e) => {
                assert!(!e.message.is_empty(), "{}: an empty reason", path.display());
                refused += 1;
            }
        }
    }
    println!("corpus: {mapped} workloads mapped, {refused} files refused with a reason");
    assert!(mapped > 0 && refused > 0);
}
