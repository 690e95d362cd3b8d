use std::path::Path;

/// One benchmark's rows: (metric, k8shell, baseline, ratio, target).
pub struct Section {
    pub title: String,
    pub rows: Vec<[String; 5]>,
    pub note: String,
}

pub struct Report {
    sections: Vec<Section>,
}

impl Report {
    pub fn new() -> Self {
        Self {
            sections: Vec::new(),
        }
    }

    pub fn push(&mut self, section: Section) {
        for row in &section.rows {
            eprintln!(
                "  {:<48} {:>14} {:>14} {:>8}",
                row[0], row[1], row[2], row[3]
            );
        }
        self.sections.push(section);
    }

    pub fn markdown(&self, machine: &str) -> String {
        let mut out = format!("Machine: {machine}.\n\n");
        for section in &self.sections {
            out.push_str(&format!("### {}\n\n", section.title));
            out.push_str(
                "| metric | k8shell | baseline | ratio | target |\n|---|---:|---:|---:|---|\n",
            );
            for row in &section.rows {
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} |\n",
                    row[0], row[1], row[2], row[3], row[4]
                ));
            }
            out.push_str(&format!("\n{}\n\n", section.note));
        }
        out
    }
}

pub fn rate(count: usize, elapsed: std::time::Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

pub fn per_sec(value: f64) -> String {
    format!("{value:.0}/s")
}

pub fn ms(value: std::time::Duration) -> String {
    format!("{:.2} ms", value.as_secs_f64() * 1000.0)
}

pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// p50 and p99 rows comparing sorted samples with sorted baseline samples.
pub fn percentile_rows(
    ours: &[std::time::Duration],
    baseline: &[std::time::Duration],
    targets: [&str; 2],
) -> Vec<[String; 5]> {
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .zip(targets)
        .map(|((name, p), target)| {
            let (a, b) = (percentile(ours, p), percentile(baseline, p));
            [
                name.to_owned(),
                ms(a),
                ms(b),
                format!("{:.1}×", a.as_secs_f64() / b.as_secs_f64()),
                target.to_owned(),
            ]
        })
        .collect()
}

/// Replaces the text between `<!-- bench:NAME:start -->` and
/// `<!-- bench:NAME:end -->` in `path`.
pub fn write_section(path: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let (Some(a), Some(b)) = (text.find(&start), text.find(&end)) else {
        anyhow::bail!("{} has no {start} ... {end} markers", path.display());
    };
    let updated = format!("{}{start}\n{body}{}", &text[..a], &text[b..]);
    std::fs::write(path, updated)?;
    Ok(())
}
