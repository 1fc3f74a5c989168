//! Models as one flat `f32` parameter vector with known tensor shapes: softmax
//! regression and a ReLU MLP, with forward/backward passes, cross-entropy,
//! SGD with momentum and evaluation.
//!
//! Layout: for each dense layer in order, the weight matrix `[inputs, outputs]`
//! row-major, then the bias `[outputs]`. Updates, aggregation and noise all work
//! on this flat vector; [`Architecture::tensors`] names the pieces.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut1, ArrayViewMut2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;

/// Largest model we build or load, in parameters (64 Mi, 256 MiB of `f32`).
pub const MAX_PARAMS: usize = 64 << 20;

/// Most hidden layers an MLP may have.
pub const MAX_HIDDEN_LAYERS: usize = 16;

/// Why a model could not be built or used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelError {
    /// A layer width is zero.
    #[error("layer widths must be positive, got {widths:?}")]
    ZeroWidth {
        /// Inputs, hidden widths and classes in order.
        widths: Vec<usize>,
    },
    /// Too many hidden layers.
    #[error("{layers} hidden layers is more than the limit of {MAX_HIDDEN_LAYERS}")]
    TooDeep {
        /// Hidden layers asked for.
        layers: usize,
    },
    /// The parameter count is above [`MAX_PARAMS`] (or overflows).
    #[error("the architecture needs more than {MAX_PARAMS} parameters")]
    TooLarge,
    /// A parameter vector has the wrong length for the architecture.
    #[error("expected {expected} parameters, got {found}")]
    WrongLength {
        /// What the architecture needs.
        expected: usize,
        /// What was given.
        found: usize,
    },
    /// Data does not fit the model.
    #[error("model takes {expected} features, data has {found}")]
    WrongFeatures {
        /// Model inputs.
        expected: usize,
        /// Data columns.
        found: usize,
    },
    /// A label is not below the model's class count.
    #[error("label {label} is out of range for a model with {classes} classes")]
    WrongClasses {
        /// The offending label.
        label: usize,
        /// Model outputs.
        classes: usize,
    },
}

/// A model's shape. Serialized (as JSON) into model files so loading can check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Architecture {
    /// Multinomial logistic regression: one dense layer, softmax.
    Softmax {
        /// Feature count.
        inputs: usize,
        /// Class count.
        classes: usize,
    },
    /// Dense layers with ReLU between them, softmax at the end.
    Mlp {
        /// Feature count.
        inputs: usize,
        /// Hidden layer widths, in order.
        hidden: Vec<usize>,
        /// Class count.
        classes: usize,
    },
}

/// A named piece of the flat parameter vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// `layers.{i}.weight` or `layers.{i}.bias`.
    pub name: String,
    /// `[inputs, outputs]` for weights, `[outputs]` for biases.
    pub shape: Vec<usize>,
    /// Where it starts in the flat vector.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements (never, for a valid architecture).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Architecture {
    /// Inputs, hidden widths and classes in order.
    pub fn widths(&self) -> Vec<usize> {
        match self {
            Self::Softmax { inputs, classes } => vec![*inputs, *classes],
            Self::Mlp {
                inputs,
                hidden,
                classes,
            } => std::iter::once(*inputs)
                .chain(hidden.iter().copied())
                .chain(std::iter::once(*classes))
                .collect(),
        }
    }

    /// Feature count.
    pub fn inputs(&self) -> usize {
        match self {
            Self::Softmax { inputs, .. } | Self::Mlp { inputs, .. } => *inputs,
        }
    }

    /// Class count.
    pub fn classes(&self) -> usize {
        match self {
            Self::Softmax { classes, .. } | Self::Mlp { classes, .. } => *classes,
        }
    }

    /// Checks widths are positive, depth and size are within limits.
    pub fn validate(&self) -> Result<(), ModelError> {
        if let Self::Mlp { hidden, .. } = self {
            if hidden.len() > MAX_HIDDEN_LAYERS {
                return Err(ModelError::TooDeep {
                    layers: hidden.len(),
                });
            }
        }
        let widths = self.widths();
        if widths.contains(&0) {
            return Err(ModelError::ZeroWidth { widths });
        }
        self.checked_num_params()
            .filter(|&n| n <= MAX_PARAMS)
            .map(|_| ())
            .ok_or(ModelError::TooLarge)
    }

    fn checked_num_params(&self) -> Option<usize> {
        self.widths().windows(2).try_fold(0usize, |acc, w| {
            w[0].checked_mul(w[1])?.checked_add(w[1])?.checked_add(acc)
        })
    }

    /// Total parameter count (call [`Architecture::validate`] first on
    /// untrusted input; this saturates instead of overflowing).
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    /// The tensors of the flat layout, in order.
    pub fn tensors(&self) -> Vec<TensorSpec> {
        let mut specs = Vec::new();
        let mut offset = 0;
        for (i, w) in self.widths().windows(2).enumerate() {
            specs.push(TensorSpec {
                name: format!("layers.{i}.weight"),
                shape: vec![w[0], w[1]],
                offset,
            });
            offset += w[0] * w[1];
            specs.push(TensorSpec {
                name: format!("layers.{i}.bias"),
                shape: vec![w[1]],
                offset,
            });
            offset += w[1];
        }
        specs
    }
}

/// Loss and accuracy of a model on a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly, in `[0, 1]`.
    pub accuracy: f64,
}

/// An architecture and its flat parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    architecture: Architecture,
    params: Vec<f32>,
}

impl Model {
    /// A freshly initialised model: He-normal weights and zero biases for an MLP;
    /// all zeros for softmax regression (its loss is convex, zero is a fine
    /// start). The same seed gives the same model.
    pub fn new(architecture: Architecture, seed: u64) -> Result<Self, ModelError> {
        architecture.validate()?;
        let mut params = vec![0.0f32; architecture.num_params()];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        if let Architecture::Mlp { .. } = architecture {
            for spec in architecture.tensors() {
                if spec.shape.len() == 2 {
                    let std = (2.0 / spec.shape[0] as f64).sqrt();
                    let normal = Normal::new(0.0, std).map_err(|_| ModelError::TooLarge)?;
                    for p in &mut params[spec.offset..spec.offset + spec.len()] {
                        *p = normal.sample(&mut rng) as f32;
                    }
                }
            }
        }
        Ok(Self {
            architecture,
            params,
        })
    }

    /// A model from existing parameters, checking the length.
    pub fn from_params(architecture: Architecture, params: Vec<f32>) -> Result<Self, ModelError> {
        architecture.validate()?;
        if params.len() != architecture.num_params() {
            return Err(ModelError::WrongLength {
                expected: architecture.num_params(),
                found: params.len(),
            });
        }
        Ok(Self {
            architecture,
            params,
        })
    }

    /// The model's shape.
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// The flat parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The flat parameters, mutably (the length cannot change).
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// Adds `delta` to the parameters (applying an aggregated update).
    pub fn apply_delta(&mut self, delta: &[f32]) -> Result<(), ModelError> {
        if delta.len() != self.params.len() {
            return Err(ModelError::WrongLength {
                expected: self.params.len(),
                found: delta.len(),
            });
        }
        for (p, d) in self.params.iter_mut().zip(delta) {
            *p += d;
        }
        Ok(())
    }

    fn layers(&self) -> Vec<(ArrayView2<'_, f32>, ArrayView1<'_, f32>)> {
        layer_views(&self.architecture, &self.params)
    }

    /// Logits for a batch, one row per example.
    pub fn forward(&self, x: ArrayView2<'_, f32>) -> Result<Array2<f32>, ModelError> {
        self.check_features(x.ncols())?;
        Ok(self.forward_all(x).pop().unwrap_or_else(|| x.to_owned()))
    }

    /// Pre-activations of every layer (the last is the logits).
    fn forward_all(&self, x: ArrayView2<'_, f32>) -> Vec<Array2<f32>> {
        let layers = self.layers();
        let mut outs: Vec<Array2<f32>> = Vec::with_capacity(layers.len());
        for (i, (w, b)) in layers.iter().enumerate() {
            let mut z = match i {
                0 => x.dot(w),
                _ => relu(&outs[i - 1]).dot(w),
            };
            z += b;
            outs.push(z);
        }
        outs
    }

    /// Predicted class per example.
    pub fn predict(&self, x: ArrayView2<'_, f32>) -> Result<Vec<usize>, ModelError> {
        Ok(self.forward(x)?.outer_iter().map(argmax).collect())
    }

    /// Mean cross-entropy of a batch; writes its gradient with respect to the
    /// flat parameters into `grad` (overwriting it).
    pub fn loss_and_gradient(
        &self,
        x: ArrayView2<'_, f32>,
        labels: &[usize],
        grad: &mut [f32],
    ) -> Result<f32, ModelError> {
        self.check_batch(x, labels)?;
        if grad.len() != self.params.len() {
            return Err(ModelError::WrongLength {
                expected: self.params.len(),
                found: grad.len(),
            });
        }
        let batch = x.nrows().max(1) as f32;
        let outs = self.forward_all(x);
        let Some(logits) = outs.last() else {
            return Ok(0.0);
        };
        let (mut dz, loss) = softmax_cross_entropy(logits, labels);
        dz /= batch;
        let layers = self.layers();
        let mut grads = layer_views_mut(&self.architecture, grad);
        for i in (0..layers.len()).rev() {
            let (gw, gb) = &mut grads[i];
            let input = match i {
                0 => x.to_owned(),
                _ => relu(&outs[i - 1]),
            };
            general_mat_mul(1.0, &input.t(), &dz, 0.0, gw);
            gb.assign(&dz.sum_axis(Axis(0)));
            if i > 0 {
                let mut da = dz.dot(&layers[i].0.t());
                da.zip_mut_with(&outs[i - 1], |d, &z| {
                    if z <= 0.0 {
                        *d = 0.0;
                    }
                });
                dz = da;
            }
        }
        Ok(loss / batch)
    }

    /// Mean loss and accuracy on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation, ModelError> {
        self.check_batch(data.features(), data.labels())?;
        if data.is_empty() {
            return Ok(Evaluation {
                loss: 0.0,
                accuracy: 0.0,
            });
        }
        let logits = self.forward(data.features())?;
        let (_, loss) = softmax_cross_entropy(&logits, data.labels());
        let correct = logits
            .outer_iter()
            .zip(data.labels())
            .filter(|(row, &l)| argmax(row.view()) == l)
            .count();
        let n = data.len() as f64;
        Ok(Evaluation {
            loss: f64::from(loss) / n,
            accuracy: correct as f64 / n,
        })
    }

    fn check_features(&self, found: usize) -> Result<(), ModelError> {
        let expected = self.architecture.inputs();
        if found != expected {
            return Err(ModelError::WrongFeatures { expected, found });
        }
        Ok(())
    }

    fn check_batch(&self, x: ArrayView2<'_, f32>, labels: &[usize]) -> Result<(), ModelError> {
        self.check_features(x.ncols())?;
        let classes = self.architecture.classes();
        if let Some(&label) = labels.iter().find(|&&l| l >= classes) {
            return Err(ModelError::WrongClasses { label, classes });
        }
        if labels.len() != x.nrows() {
            return Err(ModelError::WrongLength {
                expected: x.nrows(),
                found: labels.len(),
            });
        }
        Ok(())
    }
}

/// Plain SGD with (heavy-ball) momentum: `v ← μ·v + g; p ← p − η·v`.
#[derive(Clone, Debug)]
pub struct Sgd {
    learning_rate: f32,
    momentum: f32,
    velocity: Vec<f32>,
}

impl Sgd {
    /// An optimiser for `params` parameters.
    pub fn new(params: usize, learning_rate: f32, momentum: f32) -> Self {
        Self {
            learning_rate,
            momentum,
            velocity: vec![0.0; params],
        }
    }

    /// One step; `params` and `grad` have the length given to [`Sgd::new`].
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        for ((p, v), g) in params.iter_mut().zip(&mut self.velocity).zip(grad) {
            *v = self.momentum * *v + g;
            *p -= self.learning_rate * *v;
        }
    }
}

fn layer_views<'a>(
    arch: &Architecture,
    params: &'a [f32],
) -> Vec<(ArrayView2<'a, f32>, ArrayView1<'a, f32>)> {
    let mut out = Vec::new();
    let mut rest = params;
    for w in arch.widths().windows(2) {
        let (weight, tail) = rest.split_at(w[0] * w[1]);
        let (bias, tail) = tail.split_at(w[1]);
        rest = tail;
        // Shapes come from the same widths that sized `params`.
        if let Ok(weight) = ArrayView2::from_shape((w[0], w[1]), weight) {
            out.push((weight, ArrayView1::from(bias)));
        }
    }
    out
}

fn layer_views_mut<'a>(
    arch: &Architecture,
    params: &'a mut [f32],
) -> Vec<(ArrayViewMut2<'a, f32>, ArrayViewMut1<'a, f32>)> {
    let mut out = Vec::new();
    let mut rest = params;
    for w in arch.widths().windows(2) {
        let (weight, tail) = rest.split_at_mut(w[0] * w[1]);
        let (bias, tail) = tail.split_at_mut(w[1]);
        rest = tail;
        if let Ok(weight) = ArrayViewMut2::from_shape((w[0], w[1]), weight) {
            out.push((weight, ArrayViewMut1::from(bias)));
        }
    }
    out
}

fn relu(z: &Array2<f32>) -> Array2<f32> {
    z.mapv(|v| v.max(0.0))
}

fn argmax(row: ArrayView1<'_, f32>) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// Softmax probabilities minus one-hot targets (the logits' gradient of the
/// summed loss), and the summed cross-entropy.
fn softmax_cross_entropy(logits: &Array2<f32>, labels: &[usize]) -> (Array2<f32>, f32) {
    let mut grad = logits.clone();
    let mut loss = 0.0f64;
    for (mut row, &label) in grad.outer_iter_mut().zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        row.mapv_inplace(|v| (v - max).exp());
        let sum: f32 = row.sum();
        row /= sum;
        loss -= f64::from(row[label].max(1e-30).ln());
        row[label] -= 1.0;
    }
    (grad, loss as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Standardizer;
    use rand::seq::SliceRandom;

    fn mlp(hidden: Vec<usize>) -> Architecture {
        Architecture::Mlp {
            inputs: 5,
            hidden,
            classes: 3,
        }
    }

    #[test]
    fn layout_and_validation() {
        let a = mlp(vec![4, 2]);
        assert_eq!(a.num_params(), 5 * 4 + 4 + 4 * 2 + 2 + 2 * 3 + 3);
        let t = a.tensors();
        assert_eq!(t[2].name, "layers.1.weight");
        assert_eq!(t[2].offset, 24);
        assert_eq!(t.last().map(|s| s.offset + s.len()), Some(a.num_params()));
        assert!(matches!(
            mlp(vec![0]).validate(),
            Err(ModelError::ZeroWidth { .. })
        ));
        let huge = Architecture::Softmax {
            inputs: usize::MAX / 2,
            classes: 4,
        };
        assert_eq!(huge.validate(), Err(ModelError::TooLarge));
        assert!(matches!(
            mlp(vec![1; 17]).validate(),
            Err(ModelError::TooDeep { layers: 17 })
        ));
    }

    #[test]
    fn same_seed_same_model() -> anyhow::Result<()> {
        assert_eq!(Model::new(mlp(vec![8]), 1)?, Model::new(mlp(vec![8]), 1)?);
        assert_ne!(Model::new(mlp(vec![8]), 1)?, Model::new(mlp(vec![8]), 2)?);
        Ok(())
    }

    /// Backpropagation agrees with central finite differences.
    #[test]
    fn gradient_matches_finite_differences() -> anyhow::Result<()> {
        for arch in [
            mlp(vec![4, 3]),
            Architecture::Softmax {
                inputs: 5,
                classes: 3,
            },
        ] {
            let mut model = Model::new(arch, 3)?;
            for (i, p) in model.params_mut().iter_mut().enumerate() {
                *p += 0.01 * (i % 7) as f32; // non-zero biases too
            }
            let x = Array2::from_shape_fn((4, 5), |(i, j)| ((i * 5 + j) as f32 * 0.37).sin());
            let labels = [0, 2, 1, 2];
            let mut grad = vec![0.0; model.params().len()];
            model.loss_and_gradient(x.view(), &labels, &mut grad)?;
            let mut scratch = vec![0.0; grad.len()];
            for (k, &backprop) in grad.iter().enumerate() {
                let h = 1e-2f32;
                let mut plus = model.clone();
                plus.params_mut()[k] += h;
                let mut minus = model.clone();
                minus.params_mut()[k] -= h;
                let lp = plus.loss_and_gradient(x.view(), &labels, &mut scratch)?;
                let lm = minus.loss_and_gradient(x.view(), &labels, &mut scratch)?;
                let numeric = (lp - lm) / (2.0 * h);
                assert!(
                    (numeric - backprop).abs() < 2e-3,
                    "param {k}: numeric {numeric} vs backprop {backprop}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn sgd_learns_digits() -> anyhow::Result<()> {
        let (mut train, mut test) = Dataset::digits()?.split(0.2, 0)?;
        let s = Standardizer::fit(&train);
        s.apply(&mut train)?;
        s.apply(&mut test)?;
        let arch = Architecture::Softmax {
            inputs: 64,
            classes: 10,
        };
        let mut model = Model::new(arch, 0)?;
        let mut sgd = Sgd::new(model.params().len(), 0.1, 0.9);
        let mut grad = vec![0.0; model.params().len()];
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..5 {
            order.shuffle(&mut rng);
            for batch in order.chunks(32) {
                let b = train.subset(batch);
                model.loss_and_gradient(b.features(), b.labels(), &mut grad)?;
                sgd.step(model.params_mut(), &grad);
            }
        }
        let eval = model.evaluate(&test)?;
        assert!(eval.accuracy > 0.93, "{eval:?}");
        Ok(())
    }

    #[test]
    fn shape_errors_are_reported() -> anyhow::Result<()> {
        let model = Model::new(mlp(vec![2]), 0)?;
        let x = Array2::<f32>::zeros((2, 4));
        assert_eq!(
            model.forward(x.view()),
            Err(ModelError::WrongFeatures {
                expected: 5,
                found: 4
            })
        );
        let x = Array2::<f32>::zeros((1, 5));
        let mut grad = vec![0.0; model.params().len()];
        assert_eq!(
            model.loss_and_gradient(x.view(), &[3], &mut grad),
            Err(ModelError::WrongClasses {
                label: 3,
                classes: 3
            })
        );
        Ok(())
    }
}
