//! System load samples for cpu, memory and disk resources, and (feature `system`) a sampler that
//! reads them from the machine with `sysinfo` on an interval.

/// Machine load in percent; `None` leaves resources of that type untouched.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct SystemSample {
    /// Global CPU usage.
    pub cpu_percent: Option<f64>,
    /// Used memory of the total.
    pub memory_percent: Option<f64>,
    /// Used space of all disks together.
    pub disk_percent: Option<f64>,
}

impl SystemSample {
    /// A sample with the given percentages.
    pub fn new(cpu: Option<f64>, memory: Option<f64>, disk: Option<f64>) -> Self {
        Self {
            cpu_percent: cpu,
            memory_percent: memory,
            disk_percent: disk,
        }
    }
}

#[cfg(feature = "system")]
mod sampler {
    use std::sync::{Arc, Weak};
    use std::time::Duration;

    use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

    use super::SystemSample;
    use crate::LoadManager;

    /// Reads the machine's load.
    struct Reader {
        system: System,
        disks: Disks,
    }

    impl Reader {
        fn new() -> Self {
            let system = System::new_with_specifics(
                RefreshKind::nothing()
                    .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                    .with_memory(MemoryRefreshKind::nothing().with_ram()),
            );
            Self {
                system,
                disks: Disks::new_with_refreshed_list(),
            }
        }

        fn read(&mut self) -> SystemSample {
            self.system.refresh_cpu_usage();
            self.system.refresh_memory();
            self.disks.refresh(true);
            let total = self.system.total_memory();
            let memory =
                (total > 0).then(|| self.system.used_memory() as f64 * 100.0 / total as f64);
            let (size, free) = self.disks.list().iter().fold((0u64, 0u64), |(s, f), d| {
                (s + d.total_space(), f + d.available_space())
            });
            let disk = (size > 0).then(|| (size - free.min(size)) as f64 * 100.0 / size as f64);
            SystemSample::new(
                Some(f64::from(self.system.global_cpu_usage())),
                memory,
                disk,
            )
        }
    }

    /// Takes one sample of the machine now (CPU usage is measured since the previous refresh,
    /// so a single call reports little; the sampler's interval gives it meaning).
    pub fn sample_system() -> SystemSample {
        Reader::new().read()
    }

    impl LoadManager {
        /// Samples the machine every `interval` on a blocking thread and sets the usage of
        /// every cpu, memory and disk resource to the sampled percentage of its capacity, so
        /// thresholds and events track real load. Needs a Tokio runtime; replaces a sampler
        /// already running; stopped by [`stop_sampler`](Self::stop_sampler), by the
        /// extension's shutdown, or when the manager is dropped.
        pub fn start_system_sampler(self: &Arc<Self>, interval: Duration) {
            let weak: Weak<Self> = Arc::downgrade(self);
            let handle = tokio::spawn(async move {
                let mut reader = Some(Reader::new());
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(mut r) = reader.take() else { break };
                    let joined = tokio::task::spawn_blocking(move || {
                        let s = r.read();
                        (r, s)
                    })
                    .await;
                    let Ok((r, sample)) = joined else { break };
                    reader = Some(r);
                    let Some(manager) = weak.upgrade() else { break };
                    manager.apply_system_sample(&sample);
                }
            });
            self.set_sampler(handle);
        }
    }
}

#[cfg(feature = "system")]
pub use sampler::sample_system;
