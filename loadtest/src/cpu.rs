//! CPU time that processes spend during a phase, read from `/proc/<pid>/stat`: where the cost
//! of a job goes when the load generator, the server and the fleet share one machine.

use std::str::FromStr;

use nix::unistd::{SysconfVar, sysconf};

/// A process to watch, given on the command line as `name=pid`.
#[derive(Debug, Clone)]
pub struct Watched {
    name: String,
    pid: u32,
}

impl FromStr for Watched {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not name=pid"))?;
        let pid = pid
            .parse()
            .map_err(|e| format!("{pid:?} is not a process id: {e}"))?;
        Ok(Watched {
            name: name.to_owned(),
            pid,
        })
    }
}

/// The watched processes plus this one (`loadtest`).
pub struct CpuWatch {
    stat_paths: Vec<(String, String)>,
    ticks_per_second: f64,
}

/// CPU seconds (user + system, all threads) of each watched process at one moment; `None`
/// where the process could not be read (it exited).
pub struct CpuSample(Vec<Option<f64>>);

impl CpuWatch {
    pub fn new(watched: &[Watched]) -> anyhow::Result<Self> {
        let ticks = sysconf(SysconfVar::CLK_TCK)?
            .ok_or_else(|| anyhow::anyhow!("the system reports no clock tick rate"))?;
        let mut stat_paths = vec![("loadtest".to_owned(), "/proc/self/stat".to_owned())];
        for w in watched {
            if stat_paths.iter().any(|(name, _)| *name == w.name) {
                anyhow::bail!(
                    "--cpu-of names {:?} twice (loadtest is always reported)",
                    w.name
                );
            }
            stat_paths.push((w.name.clone(), format!("/proc/{}/stat", w.pid)));
        }
        Ok(CpuWatch {
            stat_paths,
            ticks_per_second: ticks as f64,
        })
    }

    pub fn sample(&self) -> CpuSample {
        CpuSample(
            self.stat_paths
                .iter()
                .map(|(_, path)| {
                    let stat = std::fs::read_to_string(path).ok()?;
                    busy_ticks(&stat).map(|ticks| ticks as f64 / self.ticks_per_second)
                })
                .collect(),
        )
    }

    /// Microseconds of CPU per job for each process between two samples.
    pub fn per_job(
        &self,
        before: &CpuSample,
        after: &CpuSample,
        jobs: usize,
    ) -> serde_json::Map<String, serde_json::Value> {
        self.stat_paths
            .iter()
            .zip(before.0.iter().zip(&after.0))
            .filter_map(|((name, _), (before, after))| {
                let seconds = (*after)? - (*before)?;
                let per_job_us = seconds * 1e6 / jobs.max(1) as f64;
                Some((name.clone(), serde_json::json!(per_job_us.round())))
            })
            .collect()
    }
}

/// utime + stime from the text of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`.
fn busy_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_count_fields_after_the_command_name() {
        let stat = "4242 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14 15";
        assert_eq!(busy_ticks(stat), Some(333));
        assert_eq!(busy_ticks("4242 (x) S 1 2"), None);
        assert_eq!(busy_ticks("garbage"), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let watch = CpuWatch::new(&[]).expect("tick rate");
        let before = watch.sample();
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let after = watch.sample();
        let per_job = watch.per_job(&before, &after, 1);
        assert!(per_job["loadtest"].as_f64().expect("a number") > 0.0);
    }

    #[test]
    fn every_reported_name_is_distinct() {
        let twice: Vec<Watched> = ["a=1", "a=2"].iter().map(|s| s.parse().unwrap()).collect();
        assert!(CpuWatch::new(&twice).is_err());
        assert!(CpuWatch::new(&["loadtest=1".parse().unwrap()]).is_err());
        assert!(CpuWatch::new(&["a=1".parse().unwrap(), "b=2".parse().unwrap()]).is_ok());
    }

    #[test]
    fn watched_processes_parse_as_name_equals_pid() {
        let w: Watched = "nats-server=17".parse().expect("valid");
        assert_eq!((w.name.as_str(), w.pid), ("nats-server", 17));
        assert!("nats-server".parse::<Watched>().is_err());
        assert!("x=y".parse::<Watched>().is_err());
    }
}
