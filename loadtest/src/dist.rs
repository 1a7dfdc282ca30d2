//! Distributions of small counts given on the command line (texts per job, words per text):
//! `N` (always N), `LO..HI` (uniform, both ends included) or `V:W,V:W,...` (value V with
//! weight W), so a load can mix job shapes the way real callers do.

use std::{fmt, str::FromStr};

use rand::{
    Rng,
    distributions::{Distribution, WeightedIndex},
};

/// Largest value a distribution may draw: a job holds at most `u16::MAX` texts on the wire.
const MAX_VALUE: u32 = u16::MAX as u32;

#[derive(Debug, Clone)]
pub struct Dist {
    spec: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Fixed(u32),
    Uniform(u32, u32),
    Weighted(Vec<u32>, WeightedIndex<f64>),
}

impl Dist {
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match &self.kind {
            Kind::Fixed(value) => *value,
            Kind::Uniform(low, high) => rng.gen_range(*low..=*high),
            Kind::Weighted(values, index) => values[index.sample(rng)],
        }
    }
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

fn count(text: &str) -> Result<u32, String> {
    let value: u32 = text
        .trim()
        .parse()
        .map_err(|e| format!("{text:?} is not a count: {e}"))?;
    if !(1..=MAX_VALUE).contains(&value) {
        return Err(format!("{value} is not between 1 and {MAX_VALUE}"));
    }
    Ok(value)
}

impl FromStr for Dist {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s.trim().to_owned();
        let kind = if spec.contains(':') {
            let mut values = Vec::new();
            let mut weights = Vec::new();
            for part in spec.split(',') {
                let (value, weight) = part
                    .split_once(':')
                    .ok_or_else(|| format!("{part:?} is not value:weight"))?;
                let weight: f64 = weight
                    .trim()
                    .parse()
                    .map_err(|e| format!("{weight:?} is not a weight: {e}"))?;
                if !(weight.is_finite() && weight > 0.0) {
                    return Err(format!("weight {weight} must be positive"));
                }
                values.push(count(value)?);
                weights.push(weight);
            }
            let index = WeightedIndex::new(&weights).map_err(|e| e.to_string())?;
            Kind::Weighted(values, index)
        } else if let Some((low, high)) = spec.split_once("..") {
            let (low, high) = (count(low)?, count(high)?);
            if low > high {
                return Err(format!("{spec:?}: the low end is above the high end"));
            }
            Kind::Uniform(low, high)
        } else {
            Kind::Fixed(count(&spec)?)
        };
        Ok(Dist { spec, kind })
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn draws(spec: &str) -> Vec<u32> {
        let dist: Dist = spec.parse().expect("valid");
        let mut rng = StdRng::seed_from_u64(7);
        (0..2000).map(|_| dist.sample(&mut rng)).collect()
    }

    #[test]
    fn fixed_uniform_and_weighted_draw_what_they_say() {
        assert!(draws("4").iter().all(|&v| v == 4));
        let uniform = draws("2..5");
        assert!(uniform.iter().all(|v| (2..=5).contains(v)));
        for end in [2, 5] {
            assert!(uniform.contains(&end), "both ends are drawn");
        }
        let weighted = draws("1:3,32:1");
        assert!(weighted.iter().all(|&v| v == 1 || v == 32));
        let ones = weighted.iter().filter(|&&v| v == 1).count();
        assert!(
            (1300..1700).contains(&ones),
            "about 3 in 4 draws are 1: {ones}"
        );
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "0", "-1", "x", "5..2", "1..x", "1:0", "1:-2", "1:2,", "70000", "",
        ] {
            assert!(bad.parse::<Dist>().is_err(), "{bad:?} was accepted");
        }
        assert_eq!("1..3".parse::<Dist>().expect("valid").to_string(), "1..3");
    }
}
