//! `trace --pprof`: blocking time as a pprof profile (gzipped
//! `profile.proto`), which `go tool pprof`, Grafana Pyroscope and Parca
//! read. Two sample types: `blocking/nanoseconds` (the default) and
//! `events/count`; frames with their file and line where known, inlined
//! frames as extra lines of their caller's location, and the process,
//! class, syscall and detector as sample labels.
//!
//! The messages are written out by hand from pprof's `profile.proto`
//! (prost derives their encoding): six small messages do not need a
//! code generator in the build.

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::event::{Event, Frame};

#[derive(Debug, thiserror::Error)]
pub enum PprofError {
    #[error("cannot write the pprof profile to {path}: {err} (choose a writable path)")]
    Write {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
}

/// The messages of pprof's profile.proto that blockwatch fills in, with
/// their field numbers.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
    }
}

/// One sample's identity: its locations (innermost first) and labels.
type SampleKey = (Vec<u64>, Vec<(i64, i64)>, u32);

/// Builds a profile from events as they come; memory grows with distinct
/// stacks, not with events.
#[derive(Default)]
pub struct Pprof {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    locations: HashMap<Vec<(u64, u64, i64)>, u64>,
    mappings: HashMap<i64, u64>,
    profile: proto::Profile,
    samples: HashMap<SampleKey, [i64; 2]>,
    first: Option<SystemTime>,
}

impl Pprof {
    pub fn new() -> Self {
        let mut p = Pprof::default();
        // String 0 is always "".
        p.string("");
        p
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&id) = self.string_ids.get(s) {
            return id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), id);
        id
    }

    fn function(&mut self, f: &Frame) -> u64 {
        let name = crate::output::metrics::culprit_label(Some(f));
        let name = self.string(&name);
        let file = f.file.as_deref().or(f.module.as_deref()).unwrap_or("");
        let file = self.string(file);
        let next = self.functions.len() as u64 + 1;
        *self.functions.entry((name, file)).or_insert_with(|| {
            self.profile.function.push(proto::Function {
                id: next,
                name,
                system_name: name,
                filename: file,
            });
            next
        })
    }

    fn mapping(&mut self, module: Option<&str>) -> u64 {
        let Some(module) = module else { return 0 };
        let filename = self.string(module);
        let next = self.mappings.len() as u64 + 1;
        *self.mappings.entry(filename).or_insert_with(|| {
            // Functions, files and lines come with the profile: pprof
            // must not try to symbolize the addresses itself.
            self.profile.mapping.push(proto::Mapping {
                id: next,
                filename,
                has_functions: true,
                has_filenames: true,
                has_line_numbers: true,
                has_inline_frames: true,
            });
            next
        })
    }

    /// A location for `frames`: inlined frames (innermost first) and the
    /// frame they were inlined into, last.
    fn location(&mut self, frames: &[&Frame]) -> u64 {
        let Some(outer) = frames.last() else {
            return 0;
        };
        let mapping_id = self.mapping(outer.module.as_deref());
        let lines: Vec<proto::Line> = frames
            .iter()
            .map(|f| proto::Line {
                function_id: self.function(f),
                line: f.line.map(i64::from).unwrap_or(0),
            })
            .collect();
        let key: Vec<(u64, u64, i64)> = lines
            .iter()
            .map(|l| (outer.address, l.function_id, l.line))
            .collect();
        let next = self.locations.len() as u64 + 1;
        *self.locations.entry(key).or_insert_with(|| {
            self.profile.location.push(proto::Location {
                id: next,
                mapping_id,
                address: outer.address,
                line: lines,
            });
            next
        })
    }

    /// Adds one event's blocking time under its stack.
    pub fn add(&mut self, ev: &Event) {
        self.first = Some(self.first.map_or(ev.ts, |t| t.min(ev.ts)));
        // pprof takes the first mapping for the main binary: the
        // outermost one that is no shared library (threads start in
        // libc's clone).
        let exe = ev
            .stack
            .iter()
            .rev()
            .filter_map(|f| f.module.as_deref())
            .find(|m| !m.contains(".so"));
        self.mapping(exe);
        let mut ids = Vec::new();
        let mut group: Vec<&Frame> = Vec::new();
        for f in &ev.stack {
            group.push(f);
            if !f.inlined {
                ids.push(self.location(&group));
                group.clear();
            }
        }
        if !group.is_empty() {
            ids.push(self.location(&group));
        }
        let syscall = crate::output::metrics::syscall_label(ev);
        let labels = [
            ("process", ev.comm.as_str()),
            ("class", ev.class.as_str()),
            ("syscall", syscall.as_str()),
            ("detector", ev.detector.as_str()),
        ]
        .map(|(k, v)| (self.string(k), self.string(v)))
        .to_vec();
        let v = self.samples.entry((ids, labels, ev.pid)).or_default();
        v[0] += ev.duration_ns.min(i64::MAX as u64) as i64;
        v[1] += 1;
    }

    /// The encoded profile, gzipped; `duration` is how long the trace ran.
    pub fn encode(mut self, duration: std::time::Duration) -> Vec<u8> {
        let blocking = self.string("blocking");
        let nanoseconds = self.string("nanoseconds");
        let events = self.string("events");
        let count = self.string("count");
        let pid = self.string("pid");
        let mut samples: Vec<_> = std::mem::take(&mut self.samples).into_iter().collect();
        // Deterministic output for the same events.
        samples.sort();
        let mut p = self.profile;
        p.sample_type = vec![
            proto::ValueType {
                r#type: blocking,
                unit: nanoseconds,
            },
            proto::ValueType {
                r#type: events,
                unit: count,
            },
        ];
        p.default_sample_type = blocking;
        p.period_type = Some(proto::ValueType {
            r#type: blocking,
            unit: nanoseconds,
        });
        p.period = 1;
        p.time_nanos = self
            .first
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos().min(i64::MAX as u128) as i64);
        p.duration_nanos = duration.as_nanos().min(i64::MAX as u128) as i64;
        p.sample = samples
            .into_iter()
            .map(|((location_id, labels, pid_num), value)| {
                let mut label: Vec<proto::Label> = labels
                    .into_iter()
                    .map(|(key, str)| proto::Label { key, str, num: 0 })
                    .collect();
                label.push(proto::Label {
                    key: pid,
                    str: 0,
                    num: i64::from(pid_num),
                });
                proto::Sample {
                    location_id,
                    value: value.to_vec(),
                    label,
                }
            })
            .collect();
        p.string_table = self.strings;
        gzip(&p.encode_to_vec())
    }

    /// Writes [`Pprof::encode`] to `path`.
    pub fn write(
        self,
        duration: std::time::Duration,
        path: &std::path::Path,
    ) -> Result<(), PprofError> {
        std::fs::write(path, self.encode(duration)).map_err(|err| PprofError::Write {
            path: path.to_path_buf(),
            err,
        })
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(bytes);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;
    use crate::event::FrameKind;

    fn frame(function: &str, file: Option<&str>, line: Option<u32>, inlined: bool) -> Frame {
        Frame {
            address: 0x1000,
            function: Some(function.into()),
            module: Some("/usr/bin/svc".into()),
            file: file.map(Into::into),
            line,
            inlined,
            kind: FrameKind::Native,
        }
    }

    fn ev(ms: u64) -> Event {
        let stack = vec![
            frame("read", None, None, false),
            frame("load", Some("src/load.rs"), Some(9), true),
            frame("main", Some("src/main.rs"), Some(3), false),
        ];
        let mut ev = crate::output::fixtures::stack_event(stack, None, ms);
        ev.ts = UNIX_EPOCH + std::time::Duration::from_secs(5);
        ev.pid = 7;
        ev
    }

    fn decode(gz: &[u8]) -> proto::Profile {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .unwrap();
        proto::Profile::decode(raw.as_slice()).unwrap()
    }

    #[test]
    fn same_stacks_sum_and_inlined_frames_share_a_location() {
        let mut p = Pprof::new();
        p.add(&ev(80));
        p.add(&ev(20));
        let prof = decode(&p.encode(std::time::Duration::from_secs(2)));
        let s = |i: i64| prof.string_table[i as usize].as_str();
        assert_eq!(s(prof.sample_type[0].r#type), "blocking");
        assert_eq!(s(prof.sample_type[0].unit), "nanoseconds");
        assert_eq!(prof.sample.len(), 1);
        assert_eq!(prof.sample[0].value, vec![100_000_000, 2]);
        assert_eq!(
            prof.sample[0].location_id.len(),
            2,
            "load is inlined into main"
        );
        let outer = &prof.location[prof.sample[0].location_id[1] as usize - 1];
        let names: Vec<&str> = outer
            .line
            .iter()
            .map(|l| s(prof.function[l.function_id as usize - 1].name))
            .collect();
        assert_eq!(names, ["load", "main"]);
        assert_eq!(outer.line[1].line, 3);
        assert_eq!(prof.time_nanos, 5_000_000_000);
        assert_eq!(prof.duration_nanos, 2_000_000_000);
    }
}
