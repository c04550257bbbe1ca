//! Which cell takes a tenant or a workload: the router's one decision, made from the cells'
//! summaries alone (never their internals), and explained.
//!
//! For a workload, every cell is judged in order: its site must be allowed (listed sites, the
//! asked site kind, every latency target from its traffic source), the cell must be healthy,
//! and it must have the free CPU and memory for all the replicas. Among the cells that pass,
//! the tenant's home cell wins (no overflow); then the best latency to the workload's traffic
//! sources; then the most free CPU. A workload no cell can take is refused with the reason for
//! every cell, so an operator sees why — "edge-3: 19 ms to users-eu, at most 10 allowed".
//!
//! A tenant's home cell is the healthy cell with the most free CPU at an allowed site.

use std::collections::BTreeMap;

use cellplane_api::{CellId, Name, Placement, SiteId, SiteKind};

/// A site, as the router knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteView {
    /// Cloud or edge.
    pub kind: SiteKind,
    /// Round-trip latency from named traffic sources, in milliseconds.
    pub latency_ms: BTreeMap<Name, u32>,
}

/// A cell, as its last summary showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellView {
    /// The cell.
    pub cell: CellId,
    /// Its site.
    pub site: SiteId,
    /// Whether it answers (its last summary is fresh).
    pub healthy: bool,
    /// Whether an operator is emptying it: it takes nothing new.
    pub draining: bool,
    /// Free CPU on ready hosts, in thousandths of a core.
    pub free_cpu_milli: u64,
    /// Free memory on ready hosts, in MiB.
    pub free_memory_mib: u64,
}

/// What a workload needs in total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    /// CPU for every replica, in thousandths of a core.
    pub cpu_milli: u64,
    /// Memory for every replica, in MiB.
    pub memory_mib: u64,
}

/// Why one cell was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The cell.
    pub cell: CellId,
    /// Its site.
    pub site: SiteId,
    /// Why, in words.
    pub reason: String,
}

/// A choice and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The chosen cell.
    pub cell: CellId,
    /// Whether it is not the tenant's home cell.
    pub overflow: bool,
    /// Every cell that was not chosen, and why.
    pub rejected: Vec<Rejection>,
}

/// No cell can take it; every cell's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no cell can take it: {}", explain(.0))]
pub struct NoCell(pub Vec<Rejection>);

fn explain(rejections: &[Rejection]) -> String {
    if rejections.is_empty() {
        return "the region has no cells".into();
    }
    rejections
        .iter()
        .map(|r| format!("{} (site {}): {}", r.cell, r.site, r.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Chooses the cell for a workload of a tenant whose home cell is `home`.
pub fn choose_cell(
    sites: &BTreeMap<SiteId, SiteView>,
    cells: &[CellView],
    home: Option<&CellId>,
    placement: &Placement,
    demand: Demand,
) -> Result<Choice, NoCell> {
    let mut rejected = Vec::new();
    // Sorted by (not home, worst latency, less free CPU): the first wins.
    let mut fits = Vec::new();
    for cell in cells {
        match judge(sites, cell, placement, demand) {
            Ok(latency) => {
                let not_home = Some(&cell.cell) != home;
                fits.push(((not_home, latency, std::cmp::Reverse(cell.free_cpu_milli)), cell));
            }
            Err(reason) => rejected.push(Rejection {
                cell: cell.cell.clone(),
                site: cell.site.clone(),
                reason,
            }),
        }
    }
    fits.sort_by_key(|(key, _)| *key);
    let mut fits = fits.into_iter();
    let Some(((overflow, _, _), chosen)) = fits.next() else { return Err(NoCell(rejected)) };
    for (_, cell) in fits {
        let reason = "fits, but another cell fits better".into();
        rejected.push(Rejection { cell: cell.cell.clone(), site: cell.site.clone(), reason });
    }
    Ok(Choice { cell: chosen.cell.clone(), overflow, rejected })
}

/// Chooses a new tenant's home cell: the healthy cell with the most free CPU at an allowed
/// site.
pub fn choose_home(
    sites: &BTreeMap<SiteId, SiteView>,
    cells: &[CellView],
    placement: &Placement,
) -> Result<Choice, NoCell> {
    choose_cell(sites, cells, None, placement, Demand::default())
        .map(|c| Choice { overflow: false, ..c })
}

/// Whether `cell` can take the workload; its worst latency to the workload's sources if so.
fn judge(
    sites: &BTreeMap<SiteId, SiteView>,
    cell: &CellView,
    placement: &Placement,
    demand: Demand,
) -> Result<u32, String> {
    let Some(site) = sites.get(&cell.site) else {
        return Err("its site is not in the region's site list".into());
    };
    if !placement.sites.is_empty() && !placement.sites.contains(&cell.site) {
        return Err("site not allowed by the workload".into());
    }
    if let Some(kind) = placement.site_kind
        && kind != site.kind
    {
        return Err(format!(
            "a {} site; the workload asks for {}",
            kind_name(site.kind),
            kind_name(kind)
        ));
    }
    let mut worst = 0;
    for target in &placement.latency {
        match site.latency_ms.get(&target.source) {
            None => return Err(format!("no latency known from {}", target.source)),
            Some(&ms) if ms > target.max_ms => {
                return Err(format!(
                    "{ms} ms to {}, at most {} allowed",
                    target.source, target.max_ms
                ));
            }
            Some(&ms) => worst = worst.max(ms),
        }
    }
    if !cell.healthy {
        return Err("cell unavailable".into());
    }
    if cell.draining {
        return Err("cell draining".into());
    }
    if demand.cpu_milli > cell.free_cpu_milli || demand.memory_mib > cell.free_memory_mib {
        return Err(format!(
            "needs {} mCPU and {} MiB, has {} and {} free",
            demand.cpu_milli, demand.memory_mib, cell.free_cpu_milli, cell.free_memory_mib
        ));
    }
    Ok(worst)
}

fn kind_name(kind: SiteKind) -> &'static str {
    match kind {
        SiteKind::Cloud => "cloud",
        SiteKind::Edge => "edge",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::LatencyTarget;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn region() -> (BTreeMap<SiteId, SiteView>, Vec<CellView>) {
        let site = |kind, eu: u32, us: u32| SiteView {
            kind,
            latency_ms: [(name("users-eu"), eu), (name("users-us"), us)].into(),
        };
        let sites = [
            (SiteId::new("dc-1").unwrap(), site(SiteKind::Cloud, 30, 90)),
            (SiteId::new("edge-fra").unwrap(), site(SiteKind::Edge, 4, 110)),
            (SiteId::new("edge-nyc").unwrap(), site(SiteKind::Edge, 85, 5)),
        ]
        .into();
        let cell = |c: &str, s: &str, free: u64| CellView {
            cell: CellId::new(c).unwrap(),
            site: SiteId::new(s).unwrap(),
            healthy: true,
            draining: false,
            free_cpu_milli: free,
            free_memory_mib: free,
        };
        let cells = vec![
            cell("a", "dc-1", 100_000),
            cell("b", "dc-1", 50_000),
            cell("e1", "edge-fra", 8_000),
            cell("e2", "edge-nyc", 8_000),
        ];
        (sites, cells)
    }

    fn latency(source: &str, max_ms: u32) -> Placement {
        Placement {
            latency: vec![LatencyTarget { source: name(source), max_ms }],
            ..Placement::default()
        }
    }

    #[test]
    fn the_home_cell_wins_while_it_has_room_then_the_workload_overflows() {
        let (sites, mut cells) = region();
        let home = CellId::new("b").unwrap();
        let small = Demand { cpu_milli: 1_000, memory_mib: 1_000 };
        let choice =
            choose_cell(&sites, &cells, Some(&home), &Placement::default(), small).unwrap();
        assert_eq!((choice.cell.as_str(), choice.overflow), ("b", false));
        cells[1].free_cpu_milli = 500;
        let choice =
            choose_cell(&sites, &cells, Some(&home), &Placement::default(), small).unwrap();
        assert_eq!((choice.cell.as_str(), choice.overflow), ("a", true));
        let why = choice.rejected.iter().find(|r| r.cell.as_str() == "b").unwrap();
        assert!(why.reason.contains("needs 1000 mCPU"), "{}", why.reason);
    }

    #[test]
    fn latency_targets_pick_the_nearest_edge_site() {
        let (sites, cells) = region();
        let choice = choose_cell(&sites, &cells, None, &latency("users-us", 20), Demand::default());
        assert_eq!(choice.unwrap().cell.as_str(), "e2");
        let choice = choose_cell(&sites, &cells, None, &latency("users-eu", 50), Demand::default());
        assert_eq!(choice.unwrap().cell.as_str(), "e1", "lowest latency among those that fit");
        let edge = Placement { site_kind: Some(SiteKind::Edge), ..Placement::default() };
        let choice = choose_cell(&sites, &cells, None, &edge, Demand::default()).unwrap();
        assert!(choice.cell.as_str().starts_with('e'));
    }

    #[test]
    fn an_impossible_placement_is_refused_with_every_cells_reason() {
        let (sites, mut cells) = region();
        let err = choose_cell(&sites, &cells, None, &latency("users-eu", 2), Demand::default())
            .unwrap_err();
        assert_eq!(err.0.len(), 4);
        let text = err.to_string();
        assert!(text.contains("e1 (site edge-fra): 4 ms to users-eu, at most 2 allowed"), "{text}");
        assert!(text.contains("a (site dc-1): 30 ms to users-eu"), "{text}");
        let err = choose_cell(&sites, &cells, None, &latency("users-mars", 500), Demand::default())
            .unwrap_err();
        assert!(err.to_string().contains("no latency known from users-mars"));
        // A down cell is passed over, with the reason.
        cells[3].healthy = false;
        let err = choose_cell(&sites, &cells, None, &latency("users-us", 20), Demand::default())
            .unwrap_err();
        assert!(err.to_string().contains("e2 (site edge-nyc): cell unavailable"), "{err}");
    }

    #[test]
    fn a_home_cell_is_the_one_with_the_most_room() {
        let (sites, cells) = region();
        assert_eq!(choose_home(&sites, &cells, &Placement::default()).unwrap().cell.as_str(), "a");
    }
}
