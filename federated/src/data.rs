//! Labelled tabular data: the CSV loader, the bundled digits set, standardization
//! and the train/test split.

use std::io::{Read, Write};
use std::path::Path;

use ndarray::{Array2, ArrayView1, ArrayView2, Axis};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Largest number of classes a dataset may declare or imply through its labels;
/// bounds what a hostile label column can make us allocate.
pub const MAX_CLASSES: usize = 65_536;

/// Largest number of feature columns a CSV row may have.
pub const MAX_FEATURES: usize = 1 << 20;

/// The UCI optical handwritten digits set as scikit-learn ships it (CC BY 4.0,
/// see `data/README.md`), embedded so the binary works anywhere.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// Why a dataset could not be loaded, built or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The CSV reader failed (I/O or invalid UTF-8) at a line.
    #[error("line {line}: {message}")]
    Csv {
        /// 1-based line number, 0 when unknown.
        line: u64,
        /// What the reader said.
        message: String,
    },
    /// A row has a different number of columns than the first one.
    #[error("line {line}: expected {expected} columns, found {found}")]
    RaggedRow {
        /// 1-based line number.
        line: u64,
        /// Columns of the first data row.
        expected: usize,
        /// Columns of this row.
        found: usize,
    },
    /// A feature cell is not a finite number.
    #[error("line {line}, column {column}: {value:?} is not a finite number")]
    NotANumber {
        /// 1-based line number.
        line: u64,
        /// 1-based column number.
        column: usize,
        /// The cell's text.
        value: String,
    },
    /// The label cell is not a non-negative integer.
    #[error("line {line}, column {column}: label {value:?} is not a non-negative integer")]
    BadLabel {
        /// 1-based line number.
        line: u64,
        /// 1-based column number (the last one).
        column: usize,
        /// The cell's text.
        value: String,
    },
    /// A label is not below the number of classes.
    #[error("line {line}, column {column}: label {label} is out of range for {classes} classes")]
    LabelOutOfRange {
        /// 1-based line number (0 when the data did not come from a file).
        line: u64,
        /// 1-based column number (0 when the data did not come from a file).
        column: usize,
        /// The label.
        label: usize,
        /// The number of classes.
        classes: usize,
    },
    /// A row needs at least one feature column and the label.
    #[error("line {line}: a row needs at least one feature and a label, found {found} columns")]
    TooFewColumns {
        /// 1-based line number.
        line: u64,
        /// Columns found.
        found: usize,
    },
    /// A row has more feature columns than [`MAX_FEATURES`].
    #[error("line {line}: {found} columns is more than the limit of {MAX_FEATURES} features")]
    TooManyColumns {
        /// 1-based line number.
        line: u64,
        /// Columns found.
        found: usize,
    },
    /// The file holds no data rows.
    #[error("no data rows")]
    Empty,
    /// The class count is zero or above [`MAX_CLASSES`].
    #[error("{classes} classes is outside 1..={MAX_CLASSES}")]
    BadClassCount {
        /// The class count asked for or implied.
        classes: usize,
    },
    /// Features and labels disagree in length.
    #[error("{features} feature rows but {labels} labels")]
    LengthMismatch {
        /// Rows of the feature matrix.
        features: usize,
        /// Number of labels.
        labels: usize,
    },
    /// A split or partition was asked for with unusable parameters.
    #[error("invalid split: {reason}")]
    InvalidSplit {
        /// What is wrong.
        reason: String,
    },
    /// Two datasets that must agree (train and test) do not.
    #[error("datasets disagree: {reason}")]
    Mismatch {
        /// What differs.
        reason: String,
    },
}

/// A labelled dataset: one row of `f32` features per example and a class label
/// in `0..classes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    features: Array2<f32>,
    labels: Vec<usize>,
    classes: usize,
}

impl Dataset {
    /// Builds a dataset, checking that lengths agree, every label is below
    /// `classes` and every feature is finite.
    pub fn new(
        features: Array2<f32>,
        labels: Vec<usize>,
        classes: usize,
    ) -> Result<Self, DataError> {
        if classes == 0 || classes > MAX_CLASSES {
            return Err(DataError::BadClassCount { classes });
        }
        if features.nrows() != labels.len() {
            return Err(DataError::LengthMismatch {
                features: features.nrows(),
                labels: labels.len(),
            });
        }
        if let Some(&label) = labels.iter().find(|&&l| l >= classes) {
            return Err(DataError::LabelOutOfRange {
                line: 0,
                column: 0,
                label,
                classes,
            });
        }
        if let Some(((row, col), value)) = features.indexed_iter().find(|(_, v)| !v.is_finite()) {
            return Err(DataError::NotANumber {
                line: 0,
                column: col + 1,
                value: format!("{value} (row {row})"),
            });
        }
        Ok(Self {
            features,
            labels,
            classes,
        })
    }

    /// The bundled UCI optical handwritten digits set: 1,797 examples, 64
    /// features (pixel counts 0..16), 10 classes.
    pub fn digits() -> Result<Self, DataError> {
        let reader = flate2::read::GzDecoder::new(DIGITS_CSV_GZ);
        Self::from_csv_reader(reader, Some(10))
    }

    /// Reads a CSV file whose last column is the integer label; see
    /// [`Dataset::from_csv_reader`].
    pub fn from_csv_path(path: &Path, classes: Option<usize>) -> Result<Self, DataError> {
        let file = std::fs::File::open(path).map_err(|source| DataError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_csv_reader(std::io::BufReader::new(file), classes)
    }

    /// Reads CSV: feature columns, then the label (a non-negative integer; `3.0`
    /// is accepted as 3). A first row with no number in it is taken as a header.
    /// With `classes` given, labels must be below it; otherwise the class count is
    /// the largest label plus one. Errors name the line and column.
    pub fn from_csv_reader<R: Read>(reader: R, classes: Option<usize>) -> Result<Self, DataError> {
        if let Some(classes) = classes {
            if classes == 0 || classes > MAX_CLASSES {
                return Err(DataError::BadClassCount { classes });
            }
        }
        let mut csv = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(reader);
        let mut values: Vec<f32> = Vec::new();
        let mut labels: Vec<usize> = Vec::new();
        let mut width: Option<usize> = None;
        let mut record = csv::StringRecord::new();
        let mut first = true;
        loop {
            let more = csv.read_record(&mut record).map_err(|e| DataError::Csv {
                line: e.position().map_or(0, |p| p.line()),
                message: e.to_string(),
            })?;
            if !more {
                break;
            }
            let line = record.position().map_or(0, |p| p.line());
            if first {
                first = false;
                if record.iter().all(|cell| cell.parse::<f64>().is_err()) {
                    continue;
                }
            }
            let found = record.len();
            let expected = match width {
                Some(w) => w,
                None => {
                    if found < 2 {
                        return Err(DataError::TooFewColumns { line, found });
                    }
                    if found - 1 > MAX_FEATURES {
                        return Err(DataError::TooManyColumns { line, found });
                    }
                    width = Some(found);
                    found
                }
            };
            if found != expected {
                return Err(DataError::RaggedRow {
                    line,
                    expected,
                    found,
                });
            }
            for (i, cell) in record.iter().take(found - 1).enumerate() {
                match cell.parse::<f32>() {
                    Ok(v) if v.is_finite() => values.push(v),
                    _ => {
                        return Err(DataError::NotANumber {
                            line,
                            column: i + 1,
                            value: truncate(cell),
                        })
                    }
                }
            }
            let cell = record.get(found - 1).unwrap_or_default();
            let label = parse_label(cell).ok_or_else(|| DataError::BadLabel {
                line,
                column: found,
                value: truncate(cell),
            })?;
            let limit = classes.unwrap_or(MAX_CLASSES);
            if label >= limit {
                return Err(DataError::LabelOutOfRange {
                    line,
                    column: found,
                    label,
                    classes: limit,
                });
            }
            labels.push(label);
        }
        let Some(width) = width else {
            return Err(DataError::Empty);
        };
        let classes = match classes {
            Some(c) => c,
            None => labels.iter().max().map_or(1, |m| m + 1),
        };
        let features = Array2::from_shape_vec((labels.len(), width - 1), values).map_err(|e| {
            DataError::Csv {
                line: 0,
                message: e.to_string(),
            }
        })?;
        Self::new(features, labels, classes)
    }

    /// Writes the dataset as CSV (no header): features, then the label.
    pub fn write_csv<W: Write>(&self, writer: W) -> Result<(), DataError> {
        let mut csv = csv::Writer::from_writer(writer);
        let mut row: Vec<String> = Vec::with_capacity(self.num_features() + 1);
        for (features, label) in self.features.outer_iter().zip(&self.labels) {
            row.clear();
            row.extend(features.iter().map(|v| v.to_string()));
            row.push(label.to_string());
            csv.write_record(&row).map_err(|e| DataError::Csv {
                line: 0,
                message: e.to_string(),
            })?;
        }
        csv.flush().map_err(|source| DataError::Io {
            path: String::from("<csv writer>"),
            source,
        })
    }

    /// Writes the dataset to a CSV file; see [`Dataset::write_csv`].
    pub fn write_csv_path(&self, path: &Path) -> Result<(), DataError> {
        let io = |source| DataError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut writer = std::io::BufWriter::new(file);
        self.write_csv(&mut writer)?;
        writer.flush().map_err(io)
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset has no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of feature columns.
    pub fn num_features(&self) -> usize {
        self.features.ncols()
    }

    /// Number of classes; labels are below it.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The feature matrix, one row per example.
    pub fn features(&self) -> ArrayView2<'_, f32> {
        self.features.view()
    }

    /// The labels, one per example.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// How many examples each class has.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[l] += 1;
        }
        counts
    }

    /// The examples at `indices`, in that order (indices must be in range).
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            features: self.features.select(Axis(0), indices),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes,
        }
    }

    /// Shuffles with `seed` and splits off `test_fraction` of the examples
    /// (rounded, at least one on each side) as the test set: `(train, test)`.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Self, Self), DataError> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(DataError::InvalidSplit {
                reason: format!("test fraction {test_fraction} is not in (0, 1)"),
            });
        }
        if self.len() < 2 {
            return Err(DataError::InvalidSplit {
                reason: format!("{} examples cannot be split in two", self.len()),
            });
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let test = ((self.len() as f64 * test_fraction).round() as usize).clamp(1, self.len() - 1);
        Ok((self.subset(&order[test..]), self.subset(&order[..test])))
    }

    /// Concatenates datasets with the same features and classes.
    pub fn concat(parts: &[Self]) -> Result<Self, DataError> {
        let first = parts.first().ok_or(DataError::Empty)?;
        for p in parts {
            if p.num_features() != first.num_features() || p.classes != first.classes {
                return Err(DataError::Mismatch {
                    reason: format!(
                        "{} features/{} classes vs {} features/{} classes",
                        p.num_features(),
                        p.classes,
                        first.num_features(),
                        first.classes
                    ),
                });
            }
        }
        let views: Vec<ArrayView2<'_, f32>> = parts.iter().map(|p| p.features.view()).collect();
        let features = ndarray::concatenate(Axis(0), &views).map_err(|e| DataError::Mismatch {
            reason: e.to_string(),
        })?;
        let labels = parts
            .iter()
            .flat_map(|p| p.labels.iter().copied())
            .collect();
        Ok(Self {
            features,
            labels,
            classes: first.classes,
        })
    }
}

/// Per-feature standardization `(x − mean) / std`, fitted on training data and
/// applied unchanged to test data so no test statistics leak into training.
#[derive(Clone, Debug, PartialEq)]
pub struct Standardizer {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Standardizer {
    /// Fits means and standard deviations on `train`. Constant columns get a
    /// deviation of 1 so they map to 0 instead of dividing by zero.
    pub fn fit(train: &Dataset) -> Self {
        let n = train.len().max(1) as f64;
        let mut mean = Vec::with_capacity(train.num_features());
        let mut std = Vec::with_capacity(train.num_features());
        for column in train.features.axis_iter(Axis(1)) {
            let m = column.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = column
                .iter()
                .map(|&v| (f64::from(v) - m).powi(2))
                .sum::<f64>()
                / n;
            let s = var.sqrt();
            mean.push(m as f32);
            std.push(if s > 1e-8 { s as f32 } else { 1.0 });
        }
        Self { mean, std }
    }

    /// Standardizes `data` in place; its feature count must match the fit.
    pub fn apply(&self, data: &mut Dataset) -> Result<(), DataError> {
        if data.num_features() != self.mean.len() {
            return Err(DataError::Mismatch {
                reason: format!(
                    "standardizer fitted on {} features, data has {}",
                    self.mean.len(),
                    data.num_features()
                ),
            });
        }
        let mean = ArrayView1::from(&self.mean);
        let std = ArrayView1::from(&self.std);
        for mut row in data.features.outer_iter_mut() {
            row -= &mean;
            row /= &std;
        }
        Ok(())
    }
}

fn parse_label(cell: &str) -> Option<usize> {
    if let Ok(v) = cell.parse::<usize>() {
        return Some(v);
    }
    let v = cell.parse::<f64>().ok()?;
    // Labels written by numpy come out as "3.0"; accept exact integers only.
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < MAX_CLASSES as f64).then_some(v as usize)
}

/// Keeps error messages bounded when a cell is huge.
fn truncate(cell: &str) -> String {
    const MAX: usize = 64;
    match cell.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &cell[..i]),
        None => cell.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, classes: Option<usize>) -> Result<Dataset, DataError> {
        Dataset::from_csv_reader(text.as_bytes(), classes)
    }

    #[test]
    fn digits_has_the_published_shape() -> anyhow::Result<()> {
        let d = Dataset::digits()?;
        assert_eq!((d.len(), d.num_features(), d.classes()), (1797, 64, 10));
        assert!(d.class_counts().iter().all(|&c| (170..=190).contains(&c)));
        assert!(d.features().iter().all(|&v| (0.0..=16.0).contains(&v)));
        Ok(())
    }

    #[test]
    fn reads_header_floats_and_integer_labels() -> anyhow::Result<()> {
        let d = load("a,b,label\n1,2.5,0\n-3,4e1,2.0\n", None)?;
        assert_eq!(d.len(), 2);
        assert_eq!(d.classes(), 3);
        assert_eq!(d.labels(), &[0, 2]);
        assert_eq!(d.features()[[1, 1]], 40.0);
        Ok(())
    }

    #[test]
    fn errors_name_line_and_column() {
        let ragged = load("1,2,0\n1,2,3,0\n", None).unwrap_err();
        assert!(
            matches!(
                ragged,
                DataError::RaggedRow {
                    line: 2,
                    expected: 3,
                    found: 4
                }
            ),
            "{ragged}"
        );
        let nan = load("1,2,0\n1,x,1\n", None).unwrap_err();
        assert!(
            matches!(
                nan,
                DataError::NotANumber {
                    line: 2,
                    column: 2,
                    ..
                }
            ),
            "{nan}"
        );
        assert_eq!(
            nan.to_string(),
            "line 2, column 2: \"x\" is not a finite number"
        );
        let inf = load("1,inf,0\n", None).unwrap_err();
        assert!(matches!(
            inf,
            DataError::NotANumber {
                line: 1,
                column: 2,
                ..
            }
        ));
        let label = load("1,2,0\n1,2,1.5\n", None).unwrap_err();
        assert!(matches!(
            label,
            DataError::BadLabel {
                line: 2,
                column: 3,
                ..
            }
        ));
        let range = load("1,2,0\n1,2,10\n", Some(10)).unwrap_err();
        assert!(matches!(
            range,
            DataError::LabelOutOfRange {
                line: 2,
                column: 3,
                label: 10,
                classes: 10
            }
        ));
        assert!(matches!(load("", None), Err(DataError::Empty)));
        assert!(matches!(
            load("5\n", None),
            Err(DataError::TooFewColumns { .. })
        ));
    }

    #[test]
    fn csv_round_trip() -> anyhow::Result<()> {
        let d = Dataset::digits()?.subset(&[0, 5, 17]);
        let mut out = Vec::new();
        d.write_csv(&mut out)?;
        assert_eq!(Dataset::from_csv_reader(&out[..], Some(10))?, d);
        Ok(())
    }

    #[test]
    fn split_is_disjoint_and_seeded() -> anyhow::Result<()> {
        let d = Dataset::digits()?;
        let (train, test) = d.split(0.2, 7)?;
        assert_eq!(train.len() + test.len(), d.len());
        assert_eq!(test.len(), 359);
        assert_eq!(d.split(0.2, 7)?.1, test);
        assert_ne!(d.split(0.2, 8)?.1, test);
        assert!(d.split(1.0, 7).is_err());
        Ok(())
    }

    #[test]
    fn standardizer_fits_on_train_only() -> anyhow::Result<()> {
        let (mut train, mut test) = Dataset::digits()?.split(0.25, 1)?;
        let s = Standardizer::fit(&train);
        s.apply(&mut train)?;
        s.apply(&mut test)?;
        for column in train.features().axis_iter(Axis(1)) {
            let m = column.iter().map(|&v| f64::from(v)).sum::<f64>() / column.len() as f64;
            assert!(m.abs() < 1e-4);
        }
        // The test set was shifted by training statistics, so its means are
        // close to, but not exactly, zero.
        assert!(test.features().iter().all(|v| v.is_finite()));
        Ok(())
    }
}
