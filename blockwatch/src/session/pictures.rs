//! `trace --flamegraph FILE.svg` and `trace --pprof FILE`: the events'
//! blocking time gathered as the trace runs, written when it ends.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::cli::TraceArgs;
use crate::event::Event;
use crate::output::metrics::Folded;
use crate::output::pprof::Pprof;

pub struct Pictures {
    flamegraph: Option<(PathBuf, Folded)>,
    pprof: Option<(PathBuf, Pprof)>,
}

impl Pictures {
    /// Checks the output folders first, so a typo fails before the
    /// trace rather than after it.
    pub fn new(args: &TraceArgs) -> anyhow::Result<Self> {
        for path in args.flamegraph.iter().chain(&args.pprof) {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                bail!(
                    "cannot write {}: the folder {} does not exist (create it, or choose another path)",
                    path.display(),
                    dir.display()
                );
            }
        }
        Ok(Pictures {
            flamegraph: args.flamegraph.clone().map(|p| (p, Folded::default())),
            pprof: args.pprof.clone().map(|p| (p, Pprof::new())),
        })
    }

    /// Every detector's events count: each is time the loop was held.
    pub fn add(&mut self, ev: &Event) {
        if let Some((_, folded)) = &mut self.flamegraph {
            folded.add(&ev.comm, &ev.comm, ev);
        }
        if let Some((_, pprof)) = &mut self.pprof {
            pprof.add(ev);
        }
    }

    /// Writes the files; returns a line to show for each.
    pub fn write(self, elapsed: Duration) -> anyhow::Result<Vec<String>> {
        let mut written = Vec::new();
        if let Some((path, folded)) = self.flamegraph {
            crate::output::flamegraph::write(
                &folded,
                "blockwatch: event-loop blocking time by stack",
                &path,
            )
            .context("--flamegraph")?;
            written.push(format!(
                "blockwatch: flame graph written to {}",
                path.display()
            ));
        }
        if let Some((path, pprof)) = self.pprof {
            pprof.write(elapsed, &path).context("--pprof")?;
            written.push(format!(
                "blockwatch: pprof profile written to {} (`go tool pprof -top {}`)",
                path.display(),
                path.display()
            ));
        }
        Ok(written)
    }
}
