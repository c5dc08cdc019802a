import pytest

from bigjax import config_lib, registry
from bigjax.errors import UserError


def test_parse_casts_values_and_bare_flags():
  args = config_lib.parse('size=3,smoke,lr=0.5,name=x', size=1, smoke=False, lr=0.1, name='a')
  assert (args.size, args.smoke, args.lr, args.name) == (3, True, 0.5, 'x')
  assert config_lib.parse(None, smoke=False).smoke is False
  assert config_lib.parse('smoke=false', smoke=True).smoke is False


@pytest.mark.parametrize(
  'arg, text',
  [
    ('bogus=1', "'bogus' is unknown; known args: size, smoke"),
    ('size=big', "size='big' is not a int"),
    ('smoke=maybe', 'not a boolean'),
  ],
)
def test_parse_rejects_bad_args(arg, text):
  with pytest.raises(UserError, match=text):
    config_lib.parse(arg, size=1, smoke=False)


def test_registry_loads_by_name_and_lists_known_names():
  assert registry.MODELS.get('cnn').__module__ == 'bigjax.models.cnn'
  assert set(registry.MODELS.names()) >= {'mlp', 'cnn', 'resnet'}
  assert not {'layers', 'attention', 'transformer'} & set(registry.MODELS.names())  # helpers
  with pytest.raises(UserError, match=r"config.model.name='cnnn' is unknown; known models: .*cnn"):
    registry.MODELS.get('cnnn')
  with pytest.raises(
    UserError,
    match=r"config.task.name='clasification' is unknown; known tasks: "
    r"causal_lm, classification, masked_lm, regression",
  ):
    registry.TASKS.get('clasification')
