//! Reading OpenMetrics text as a scrape does, strictly: for tests that check what Fleet's
//! processes count.

use std::collections::BTreeMap;

use prometheus_client::registry::Registry;

/// One scrape, parsed: every sample by its series (name and labels exactly as written), and
/// each metric family's type and unit. Fails on text that is not OpenMetrics as Fleet writes it.
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
    pub units: BTreeMap<String, String>,
    pub text: String,
}

impl Scrape {
    /// The registry's text, as `/metrics` serves it.
    pub fn of(registry: &Registry) -> Scrape {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
        Scrape::parse(text)
    }

    /// Parses `text`; panics on anything that is not OpenMetrics as Fleet writes it.
    pub fn parse(text: String) -> Scrape {
        assert!(text.ends_with("# EOF\n"), "no `# EOF` at the end:\n{text}");
        let (mut samples, mut types, mut units) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for line in text.lines().filter(|line| *line != "# EOF") {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.splitn(3, ' ');
                let (kind, family, rest) = (words.next(), words.next(), words.next());
                let (Some(kind), Some(family), Some(rest)) = (kind, family, rest) else {
                    panic!("bad comment line {line:?}");
                };
                match kind {
                    "TYPE" => types.insert(family.to_owned(), rest.to_owned()),
                    "UNIT" => units.insert(family.to_owned(), rest.to_owned()),
                    "HELP" => None,
                    _ => panic!("unknown comment line {line:?}"),
                };
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name = series.split('{').next().unwrap_or(series);
            assert!(
                types.keys().any(|family| name.starts_with(family.as_str())),
                "sample {line:?} of no declared family"
            );
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "series {series} twice"
            );
        }
        for (family, unit) in &units {
            assert!(
                family.ends_with(&format!("_{unit}")),
                "{family}: the unit {unit} must end the name"
            );
        }
        Scrape {
            samples,
            types,
            units,
            text,
        }
    }

    /// The sample of `series`, written exactly as in the text (`name{label="value",...}`).
    pub fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in\n{}", self.text))
    }

    /// The sum of every sample of metric `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| value)
            .sum()
    }

    /// Asserts the family's type and unit.
    pub fn assert_family(&self, family: &str, kind: &str, unit: Option<&str>) {
        assert_eq!(
            self.types.get(family).map(String::as_str),
            Some(kind),
            "type of {family}"
        );
        assert_eq!(
            self.units.get(family).map(String::as_str),
            unit,
            "unit of {family}"
        );
    }
}
