//! Reading the openb CSV files (Alibaba `cluster-trace-gpu-v2023`) into plain
//! records. Columns are found by header name, so the narrower
//! `openb_pod_list_multigpu20.csv` (no `gpu_spec`) reads like the others.
//! All I/O of the benchmark lives here and in [`super::run_replay`]; the
//! replay engine itself ([`super::replay`]) is pure.

use std::path::Path;

use anyhow::{Context, bail};

use super::replay::{NodeSpec, PodSpec};

/// Splits one CSV line; handles double-quoted fields with `""` escapes.
fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Header-indexed rows of a CSV text.
struct Table {
    header: Vec<String>,
    rows: Vec<(usize, Vec<String>)>,
}

impl Table {
    fn parse(text: &str) -> anyhow::Result<Table> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
            .filter(|(_, l)| !l.trim().is_empty());
        let Some((_, head)) = lines.next() else {
            bail!("empty CSV");
        };
        let header: Vec<String> = split_csv_line(head)
            .into_iter()
            .map(|h| h.trim().to_string())
            .collect();
        let rows = lines.map(|(n, l)| (n, split_csv_line(l))).collect();
        Ok(Table { header, rows })
    }

    fn column(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    fn require(&self, name: &str) -> anyhow::Result<usize> {
        self.column(name)
            .with_context(|| format!("missing column `{name}`"))
    }
}

fn field(row: &[String], col: usize, line: usize) -> anyhow::Result<&str> {
    row.get(col)
        .map(|s| s.trim())
        .with_context(|| format!("line {line}: too few fields"))
}

fn int_field(row: &[String], col: usize, line: usize, name: &str) -> anyhow::Result<i64> {
    let s = field(row, col, line)?;
    if s.is_empty() {
        return Ok(0);
    }
    s.parse::<i64>()
        .or_else(|_| s.parse::<f64>().map(|f| f as i64))
        .with_context(|| format!("line {line}: `{name}` is not a number: {s:?}"))
}

/// Parses a node list (`sn,cpu_milli,memory_mib,gpu,model`).
pub fn parse_nodes(text: &str) -> anyhow::Result<Vec<NodeSpec>> {
    let t = Table::parse(text)?;
    let (sn, cpu, mem, gpu, model) = (
        t.require("sn")?,
        t.require("cpu_milli")?,
        t.require("memory_mib")?,
        t.require("gpu")?,
        t.require("model")?,
    );
    t.rows
        .iter()
        .map(|(line, r)| {
            let gpus = int_field(r, gpu, *line, "gpu")?;
            if gpus < 0 {
                bail!("line {line}: negative GPU count");
            }
            Ok(NodeSpec {
                name: field(r, sn, *line)?.to_string(),
                cpu_milli: int_field(r, cpu, *line, "cpu_milli")?,
                memory_mib: int_field(r, mem, *line, "memory_mib")?,
                gpus: gpus as u32,
                model: field(r, model, *line)?.to_string(),
            })
        })
        .collect()
}

/// Parses a pod list (`name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]`).
/// `gpu_spec` is optional (empty = any model); other columns are ignored.
pub fn parse_pods(text: &str) -> anyhow::Result<Vec<PodSpec>> {
    let t = Table::parse(text)?;
    let (name, cpu, mem, num, milli) = (
        t.require("name")?,
        t.require("cpu_milli")?,
        t.require("memory_mib")?,
        t.require("num_gpu")?,
        t.require("gpu_milli")?,
    );
    let spec = t.column("gpu_spec");
    t.rows
        .iter()
        .map(|(line, r)| {
            let num_gpu = int_field(r, num, *line, "num_gpu")?;
            if num_gpu < 0 {
                bail!("line {line}: negative num_gpu");
            }
            let gpu_spec = match spec {
                Some(c) => field(r, c, *line).unwrap_or("").to_string(),
                None => String::new(),
            };
            Ok(PodSpec {
                name: field(r, name, *line)?.to_string(),
                cpu_milli: int_field(r, cpu, *line, "cpu_milli")?,
                memory_mib: int_field(r, mem, *line, "memory_mib")?,
                num_gpu: num_gpu as u32,
                gpu_milli: int_field(r, milli, *line, "gpu_milli")?,
                gpu_spec,
            })
        })
        .collect()
}

/// Each pod's duration in seconds, `deletion_time − creation_time` (0
/// where either is missing), in file order.
pub fn parse_pod_durations(text: &str) -> anyhow::Result<Vec<i64>> {
    let t = Table::parse(text)?;
    let (created, deleted) = (t.require("creation_time")?, t.require("deletion_time")?);
    t.rows
        .iter()
        .map(|(line, r)| {
            let c = int_field(r, created, *line, "creation_time")?;
            let d = int_field(r, deleted, *line, "deletion_time")?;
            Ok(if c > 0 && d > c { d - c } else { 0 })
        })
        .collect()
}

/// Reads a pod list file's durations ([`parse_pod_durations`]).
pub fn read_pod_durations(path: &Path) -> anyhow::Result<Vec<i64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_pod_durations(&text).with_context(|| format!("in {}", path.display()))
}

/// Reads and parses a node list file.
pub fn read_nodes(path: &Path) -> anyhow::Result<Vec<NodeSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_nodes(&text).with_context(|| format!("in {}", path.display()))
}

/// Reads and parses a pod list file.
pub fn read_pods(path: &Path) -> anyhow::Result<Vec<PodSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_pods(&text).with_context(|| format!("in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pods_with_and_without_spec() {
        let full = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos\n\
                    p1,8000,1024,1,500,G2|T4,LS\np0,0,0,0,0,,BE\n";
        let pods = parse_pods(full).unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].gpu_spec, "G2|T4");
        assert_eq!(pods[0].gpu_milli, 500);
        let narrow = "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np,1,2,8,1000\r\n";
        let pods = parse_pods(narrow).unwrap();
        assert_eq!((pods[0].num_gpu, pods[0].gpu_spec.as_str()), (8, ""));
    }

    #[test]
    fn parses_nodes_and_quotes() {
        let nodes = parse_nodes("sn,cpu_milli,memory_mib,gpu,model\n\"n,1\",64000,262144,2,P100\n")
            .unwrap();
        assert_eq!(nodes[0].name, "n,1");
        assert_eq!(nodes[0].gpus, 2);
        assert!(parse_nodes("sn,cpu_milli\nx,1\n").is_err());
    }
}
