//! Wire format: encode and checked decode of typical messages, beside raw rkyv serialization and
//! checked access of the same values (the ceiling: our envelope adds a header, a copy and the
//! model's rules).

use std::collections::BTreeMap;
use std::hint::black_box;

use cellplane_api::wire::{self, Assignment, Heartbeat, Message};
use cellplane_api::*;
use cellplane_perf::{per_call, report};
use rkyv::rancor;

fn main() {
    let heartbeat = Message::Heartbeat(Heartbeat {
        host: HostId(42),
        seq: 7,
        epoch: 3,
        state: HostState::Ready,
    });
    let assign = Message::Assign(Box::new(Assignment {
        tenant: TenantId::new("acme").expect("valid"),
        replica: Replica {
            workload: WorkloadName::new("web").expect("valid"),
            ordinal: 3,
            host: Some(HostId(42)),
            epoch: 3,
            phase: ReplicaPhase::Assigned,
        },
        spec: WorkloadSpec {
            name: WorkloadName::new("web").expect("valid"),
            kind: WorkloadKind::Container(ContainerSpec {
                image: "registry.local/web:1.4.2".into(),
                command: vec!["/bin/web".into(), "--port=8080".into()],
                env: BTreeMap::from([("MODE".into(), "prod".into())]),
            }),
            controller: Controller::Replicated,
            replicas: 10,
            resources: Resources { cpu_milli: 500, memory_mib: 512, disk_gib: 1, gpus: 0 },
            placement: Placement::default(),
            update: UpdateStrategy::default(),
        },
    }));
    const N: u32 = 200_000;
    for (name, message) in [("heartbeat", &heartbeat), ("assignment", &assign)] {
        let frame = wire::encode(message).expect("encodes");
        println!("-- {name}: {} bytes on the wire", frame.len());
        let raw = rkyv::to_bytes::<rancor::Error>(message).expect("serializes");
        let ceiling_ser = per_call(N, || {
            black_box(rkyv::to_bytes::<rancor::Error>(black_box(message)).expect("serializes"));
        });
        let ceiling_access = per_call(N, || {
            black_box(
                rkyv::access::<wire::ArchivedMessage, rancor::Error>(black_box(&raw))
                    .expect("valid"),
            );
        });
        let encode = per_call(N, || {
            black_box(wire::encode(black_box(message)).expect("encodes"));
        });
        let decode = per_call(N, || {
            black_box(wire::decode(black_box(&frame)).expect("decodes"));
        });
        report(
            &format!("{name}: raw rkyv serialize (ceiling)"),
            ceiling_ser.as_nanos() as f64,
            "ns",
        );
        report(
            &format!("{name}: raw rkyv checked access (ceiling)"),
            ceiling_access.as_nanos() as f64,
            "ns",
        );
        report(&format!("{name}: envelope encode"), encode.as_nanos() as f64, "ns");
        report(
            &format!("{name}: envelope decode (checked + rules + owned)"),
            decode.as_nanos() as f64,
            "ns",
        );
    }
}
